"""CPU affinity around the spinning measurements: this process's threads
pinned to one CPU (:func:`pinned`), and ksmd's affinity narrowed for a block
(:func:`ksmd_on`).

ksmd's affinity is not a KSM tunable but it is machine state, so it is handled
like the tunables: journaled to a marker in the state directory before it
changes, given back on every way out, and repaired by the next benchmark
session after a SIGKILL (:func:`repair_ksmd_affinity`, which
:class:`~ksmbench.bench.session.BenchSession` runs on entry).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ..errors import os_boundary


def spin_cpu() -> int | None:
    """The CPU both spinning measurements are pinned to (the last one allowed),
    or None on a single CPU.

    Where the scheduler puts a process that spins on full_scans decides the
    result: on ksmd's CPU it takes half of ksmd's time; on the other CPU it
    costs ksmd a TLB-flush interrupt per page change (measured: ~51,000 per
    100 MiB merged vs ~0).  Unpinned, ksm_tests' samples jump between the two
    regimes; pinned, both sides run in the second one.  ksmd is left alone.
    """
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1] if len(cpus) >= 2 else None


KSMD_AFFINITY_MARKER = "ksmd-affinity.json"


@contextmanager
def ksmd_on(cpus: set[int] | None, ksmd_pid: int | None):
    """Keep ksmd on ``cpus`` for the block, then give it its CPUs back.

    ksmd's CPU affinity is not a KSM tunable, but it is machine state: the
    original mask is written to a marker in the state directory first, so that
    a benchmark killed with SIGKILL is repaired by the next one
    (:func:`repair_ksmd_affinity`).
    """
    if cpus is None or ksmd_pid is None:
        yield
        return
    import json

    from ..kernel.tunables import boot_id, state_dir

    original = os.sched_getaffinity(ksmd_pid)
    marker = state_dir() / KSMD_AFFINITY_MARKER
    with os_boundary(f"writing {marker}"):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"pid": os.getpid(), "boot_id": boot_id(), "ksmd": ksmd_pid,
                                      "cpus": sorted(original)}))
    try:
        with os_boundary(f"setting the CPU affinity of ksmd (pid {ksmd_pid})"):
            os.sched_setaffinity(ksmd_pid, cpus)
        yield
    finally:
        with os_boundary(f"restoring the CPU affinity of ksmd (pid {ksmd_pid})"):
            os.sched_setaffinity(ksmd_pid, original)
        marker.unlink(missing_ok=True)


def repair_ksmd_affinity() -> str | None:
    """Give ksmd back the CPUs a killed benchmark took from it; a message, or None."""
    import json

    from ..kernel.tunables import boot_id, pid_alive, state_dir

    marker = state_dir() / KSMD_AFFINITY_MARKER
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    pid = int(record.get("pid", 0))
    if pid and pid != os.getpid() and pid_alive(pid):
        return None  # that benchmark is alive (the run lock keeps us apart anyway)
    message = None
    if record.get("boot_id") == boot_id():
        try:
            os.sched_setaffinity(int(record["ksmd"]), set(record["cpus"]))
            message = (f"gave ksmd (pid {record['ksmd']}) back CPUs {record['cpus']} that a killed "
                       f"ksmbench bench (pid {pid}) had narrowed")
        except OSError:
            message = None  # ksmd is gone (another boot of the same id cannot happen)
    marker.unlink(missing_ok=True)
    return message


@contextmanager
def pinned(cpu: int | None):
    """Run every thread of this process (and the threads and children it
    starts) on ``cpu`` only.

    Every thread, not just the caller: a thread elsewhere (a progress display's
    refresh thread, say) keeps this mm live on another CPU, and then each page
    ksmd write-protects costs a TLB-flush interrupt there.
    """
    if cpu is None:
        yield
        return
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    before = {}
    for tid in tids:
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            continue  # the thread ended meanwhile
    try:
        yield
    finally:
        for tid, mask in before.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                continue
