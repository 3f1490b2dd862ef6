"""Comparing kernels with each other and with the emulator.

* :mod:`.judge`: one kernel's observations against another's, cell by cell,
  with the emulator saying which differences a set of behaviour flags explains.
* :mod:`.builds`: base and patched kernel images from one source tree, cached.
* :mod:`.validate`: ``ksmbench validate``, the patch-validation workflow.
"""
