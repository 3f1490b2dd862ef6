"""``ksmbench savings``: what KSM saves for a real program.

* :mod:`.snapshot`: a running process's candidate pages (pagemap, /proc/pid/mem), hashed;
* :mod:`.predict`: those pages as the emulator's state, scanned to convergence;
* :mod:`.workload`: N copies of a command started with merge-any, readiness;
* :mod:`.measure`, :mod:`.run`: stepping ksmd and comparing scan by scan, churn;
* :mod:`.cli`: the command line; :mod:`.workloads`: the reference workloads.
"""
