"""Cross-check of the merge throughput against the kernel's own ``ksm_tests -P``.

``ksm_tests`` (tools/testing/selftests/mm/ksm_tests.c) is built from Debian's
``linux-source-X.Y`` closest to the kernel under test, by the toolkit's one
selftest build (:mod:`ksmbench.sources.kernel_tools`), and cached.

What ``ksm_tests -P -s S -p P`` does (6.12 source; 6.1 is the same apart from
an operator-precedence slip that skips the merge_across_nodes/pages_to_scan
writes on kernels without NUMA): save the tunables it knows, write run=2,
sleep_millisecs=0, merge_across_nodes=1 and pages_to_scan=P, fill S MiB with
'*', then time madvise(MADV_MERGEABLE) + run=1 until full_scans has grown by
2, print "Average speed: X MiB/s", and write the saved tunables back in a
``||`` chain that stops at the first failure.

Both sides run under the same tunables: before each ksm_tests run, ksmbench
sets exactly the values its own free-running merge uses, and records every
tunable ksm_tests touches in TunableChanges, so whatever ksm_tests leaves
behind is put back by ksmbench.  While each side runs, a sampler thread reads
the tunables every few milliseconds: the report shows the values *observed*
during both measurements, not the values intended.  Runs alternate (ours,
theirs, theirs, ours, ...) so that drift of a shared machine hits both alike.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..errors import Busy, KsmbenchError
from ..kernel import syscalls
from ..sources.kernel_tools import closest_series
from ..waiting import time_scale
from .affinity import ksmd_on, pinned, spin_cpu
from .probes import read_tlb_shootdowns
from .config import BenchConfig, FreeRunTunables
from .outcome import Crosscheck, CrosscheckFailure, CrosscheckNotDone, CrosscheckResult
from .session import BenchSession, fill_region, new_region
from .timings import OwnedRegion
from .stats import relative_difference, summarize

#: tunables ksm_tests reads/writes (ksm_save_def/ksm_restore in ksm_tests.c)
KSM_TESTS_TUNABLES = ("max_page_sharing", "merge_across_nodes", "sleep_millisecs", "pages_to_scan",
                      "run", "stable_node_chains_prune_millisecs", "use_zero_pages")
SAMPLED = ("pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages",
           "stable_node_chains_prune_millisecs", "merge_across_nodes", "smart_scan")
BUILD_TIMEOUT = 300.0

_SPEED = re.compile(r"Average speed:\s+([0-9.]+)\s+MiB/s")
_TIME = re.compile(r"Total time:\s+([0-9]+\.[0-9]+)\s+s")


# -- building ------------------------------------------------------------------------

def ksm_tests_binary(series: str, say: Callable[[str], None] = lambda _m: None,
                     console=None) -> tuple[Path, dict[str, Any]]:
    """ksm_tests built from the linux-source closest to ``series`` (the toolkit's
    one selftest build, :func:`ksmbench.sources.kernel_tools.ksm_selftests`, cached)."""
    from ..sources.kernel_tools import ksm_selftests

    say(f"building ksm_tests from the linux-source closest to {series}")
    build = ksm_selftests(series, console=console)
    binary = build.binaries.get("ksm_tests")
    if binary is None:
        raise KsmbenchError(build.missing.get("ksm_tests", f"{build.source}: no ksm_tests"))
    return binary, {"source_package": build.package, "source_version": build.version,
                    "binary": str(binary)}


# -- running -------------------------------------------------------------------------

class TunableSampler:
    """Reads tunables every ``period`` seconds in a thread; values seen per name."""

    def __init__(self, sysfs, names=SAMPLED, period: float = 0.005):
        self.sysfs = sysfs
        self.names = [n for n in names if sysfs.has(n)]
        self.period = period
        self.seen: dict[str, set[str]] = {n: set() for n in self.names}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for n in self.names:
                try:
                    v = self.sysfs.tunable(n)
                except KsmbenchError:
                    continue
                if v is not None:
                    self.seen[n].add(v)
            self._stop.wait(self.period)

    def __enter__(self) -> "TunableSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def parse_ksm_tests_output(text: str) -> tuple[float | None, float | None]:
    """(seconds, MiB/s) from ksm_tests -P output (plain or KTAP '# ' lines)."""
    speed = _SPEED.search(text)
    total = _TIME.search(text)
    return (float(total[1]) if total else None, float(speed[1]) if speed else None)


def run_ksm_tests_once(session: BenchSession, binary: Path, size_mib: int,
                       tun: FreeRunTunables, cpu: int | None = None) -> MergeSample:
    """One ``ksm_tests -P`` run under ``tun``; everything it changes is restored."""
    session.apply_free_tunables(tun, 0)
    for name in KSM_TESTS_TUNABLES:  # journal the value before ksm_tests runs
        current = session.sysfs.tunable(name)
        if current is not None:
            session.changes.set(name, current)
    argv = [str(binary), "-P", "-s", str(size_mib), "-p", str(tun.pages_to_scan)]
    timeout = (120 + size_mib * 2.0) * time_scale()
    cpu0 = session.cpu.sample()
    tlb0 = read_tlb_shootdowns()
    with pinned(cpu), TunableSampler(session.sysfs) as sampler:
        try:
            # the child inherits the pinning: ksm_tests spins on that CPU
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise KsmbenchError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
    ksmd_cpu = (session.cpu.sample() - cpu0).seconds  # ksmd only runs while ksm_tests merges
    tlb1 = read_tlb_shootdowns()
    session.stepper.prepared = False  # ksm_tests moved ksmd's tunables
    session.stop_ksmd()
    session.clean()
    seconds, speed = parse_ksm_tests_output(proc.stdout + proc.stderr)
    if proc.returncode != 0 or speed is None:
        last = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise KsmbenchError(f"{' '.join(argv)} failed (exit {proc.returncode}): {' | '.join(last)}")
    return MergeSample(seconds, speed, ksmd_cpu,
                       # over the whole ksm_tests process (its fill too), so an upper bound
                       None if tlb0 is None or tlb1 is None else tlb1 - tlb0, _seen(sampler))


def run_ours_once(session: BenchSession, size_mib: int, tun: FreeRunTunables,
                  cpu: int | None = None) -> MergeSample:
    """The interval measured by ksmbench *the way ksm_tests measures it*.

    A forked child plays ksm_tests' part: it owns the region (filled with
    '*', no THP advice, as ksm_tests), starts the clock, MADV_MERGEABLE,
    writes run=1, reads full_scans and spins on it until it has grown by 2.
    A child and not this process: a spinner that shares its interpreter with
    other threads (the progress display, the tunable sampler) hands the GIL
    back and forth with them.  Measured with the progress display running:
    ksmd got 0.22 of the wall time instead of 0.25, and the merge looked
    10-20 % slower than ksm_tests -P.  This process waits on a pipe
    meanwhile, as it waits for ksm_tests.
    """
    npages = size_mib * (1 << 20) // 4096
    timeout = (30 + npages * 200e-6) * time_scale()
    session.apply_free_tunables(tun, 0)
    session.changes.set("run", 0)  # journaled before the child writes run=1 itself
    run_path = str(session.sysfs.root / "run")
    scans_path = str(session.sysfs.root / "full_scans")
    cpu0 = session.cpu.sample()
    tlb0 = read_tlb_shootdowns()
    with pinned(cpu), TunableSampler(session.sysfs) as sampler:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one thread, no interpreter state shared with us
            status = 1
            try:
                os.close(rfd)
                syscalls.die_with_parent()
                if cpu is not None:
                    os.sched_setaffinity(0, {cpu})
                region = new_region(npages, thp_advice=None)
                fill_region(region, "dup")
                fd = os.open(scans_path, os.O_RDONLY)
                t0 = time.perf_counter()
                region.madvise("mergeable")
                with open(run_path, "w") as f:
                    f.write("1")
                target = int(os.pread(fd, 32, 0)) + 2
                while int(os.pread(fd, 32, 0)) < target:
                    if time.perf_counter() - t0 > timeout:
                        raise TimeoutError
                os.write(wfd, repr(time.perf_counter() - t0).encode())
                status = 0
            except BaseException as exc:  # reported through the pipe, never raised here
                try:
                    os.write(wfd, f"error {type(exc).__name__}: {exc}".encode())
                except OSError:
                    pass
            finally:
                os._exit(status)
        os.close(wfd)
        try:
            answer = _read_answer(rfd, timeout + 60, pid)
        finally:
            os.close(rfd)
    cpu1 = session.cpu.sample()
    tlb1 = read_tlb_shootdowns()
    session.stop_ksmd()
    session.clean()
    if answer.startswith("error") or not answer:
        what = answer or "no answer"
        raise KsmbenchError(f"the ksm_tests-way merge of {size_mib} MiB failed: {what}"
                            + (" (timed out: ksmd starved?)" if "TimeoutError" in what else ""))
    seconds = float(answer)
    return MergeSample(seconds, size_mib / seconds, (cpu1 - cpu0).seconds,
                       None if tlb0 is None or tlb1 is None else tlb1 - tlb0, _seen(sampler))


def _read_answer(fd: int, timeout: float, pid: int) -> str:
    """The child's one message, within ``timeout``; the child is reaped (killed
    first if it is late)."""
    import select

    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "error: no answer from the measuring child within %.0f s" % timeout
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            data = os.read(fd, 4096)
            if not data:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(data)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by the host session's reaper already
            pass


def run_idle_owner_once(session: BenchSession, size_mib: int, tun: FreeRunTunables,
                        cpu: int | None = None) -> MergeSample:
    """ksmbench's own merge measurement (the ``merge`` benchmark): the owner
    sleeps, this process polls every 0.2 ms."""
    npages = size_mib * (1 << 20) // 4096
    region = OwnedRegion(session, npages, "crosscheck")
    try:
        region.fill("tag:bench-dup")
        session.apply_free_tunables(tun, 0)
        with pinned(cpu), TunableSampler(session.sysfs) as sampler:
            timing = session.free_merge(lambda: region.madvise("mergeable"), npages, tun, 0,
                                        apply=False)
    finally:
        region.close()
        session.clean()
    return MergeSample(timing.seconds, size_mib / timing.seconds, timing.ksmd_cpu.seconds,
                       timing.tlb_shootdowns, _seen(sampler))


@dataclass(frozen=True)
class MergeSample:
    """One timed merge of the cross-check."""

    seconds: float
    mib_per_s: float
    ksmd_cpu_seconds: float | None
    #: TLB-shootdown interrupts over the interval, all CPUs (None: not x86)
    tlb_shootdowns: int | None
    #: tunable -> every value the sampler saw while it ran
    tunables_seen: dict[str, list[str]]
    loadavg: float | None = None
    repeat: int = 0


def _seen(sampler: TunableSampler) -> dict[str, list[str]]:
    return {n: sorted(v) for n, v in sampler.seen.items()}


def run_crosscheck(session: BenchSession, store, label: str, config: BenchConfig,
                   tun: FreeRunTunables, *, say: Callable[[str], None], step: Callable[[], None],
                   console=None,
                   exclusive: Callable[[str, Callable[[], Any]], Any] = lambda _what, fn: fn()
                   ) -> Crosscheck:
    size = config.crosscheck_mib_or_default
    pairs = config.crosscheck_pairs_or_default
    try:
        if config.ksm_tests:
            binary, info = Path(config.ksm_tests), {"binary": str(config.ksm_tests), "source_package": "given"}
            if not binary.exists():
                raise KsmbenchError(f"--ksm-tests {binary}: no such file")
        else:
            series = config.source_series or closest_series()
            binary, info = ksm_tests_binary(series, say, console)
    except KsmbenchError as exc:
        for _ in range(config.repeats + pairs):
            step()
        return CrosscheckNotDone(exc.one_line(), size, error_kind=type(exc).__name__)
    cpu = spin_cpu()
    ksmd = session.stepper.ksmd_pid
    same = {cpu} if cpu is not None else None
    other = (set(os.sched_getaffinity(0)) - {cpu}) if cpu is not None else None
    # (name, what it measures, ksmd's CPUs, runner)
    plan = [
        ("ksm_tests", "ksm_tests -P, ksmd on its CPU", same,
         lambda: run_ksm_tests_once(session, binary, size, tun, cpu)),
        ("ksmbench", "ksmbench the ksm_tests way, ksmd on its CPU", same,
         lambda: run_ours_once(session, size, tun, cpu)),
        ("ksm_tests-other-cpu", "ksm_tests -P, ksmd on another CPU", other,
         lambda: run_ksm_tests_once(session, binary, size, tun, cpu)),
        ("ksmbench-other-cpu", "ksmbench the ksm_tests way, ksmd on another CPU", other,
         lambda: run_ours_once(session, size, tun, cpu)),
        ("ksmbench-idle-owner", "ksmbench, idle owner", None,
         lambda: run_idle_owner_once(session, size, tun, cpu)),
    ]
    if cpu is None:  # one CPU: nothing to place
        plan = [p for p in plan if "other-cpu" not in p[0]]
    results: dict[str, list[MergeSample]] = {p[0]: [] for p in plan}
    failures: list[CrosscheckFailure] = []

    def run(who: str, what: str, ksmd_cpus, runner, r: int) -> None:
        say(f"{what}, {size} MiB #{r + 1}")

        def measure():
            with ksmd_on(ksmd_cpus, ksmd):
                return runner()

        try:
            res = exclusive(f"{what} {size} MiB #{r + 1}", measure)
        except Busy:
            raise
        except KsmbenchError as exc:
            # e.g. ksm_tests' own 120 s limit ("Scan time limit exceeded") when
            # other work on the machine starves ksmd (nice 5) on its one CPU
            failures.append(CrosscheckFailure(who, r, exc.one_line(), _loadavg()))
            return
        res = replace(res, loadavg=_loadavg(), repeat=r)
        results[who].append(res)
        metrics = {"seconds": (res.seconds, "s"), "mib_per_s": (res.mib_per_s, "MiB/s")}
        if res.ksmd_cpu_seconds is not None:
            metrics["ksmd_cpu_seconds"] = (res.ksmd_cpu_seconds, "s")
        if res.tlb_shootdowns is not None:
            metrics["tlb_shootdowns"] = (res.tlb_shootdowns, "count")
        store.add_sample(label, "crosscheck", who, size, 0, r, metrics)

    # The judged pair runs back to back, many times, in alternating order.  A
    # single ksm_tests -P result on this machine spreads by +-25 % (ksmd, nice
    # 5, shares one CPU with the spinner, and how much of it ksmd gets right
    # after a run=1 wakeup depends on its scheduling history); adjacent runs see
    # the same history, and the median of many pairs is stable to ~1 %
    # (measured: 15 pairs, 226 vs 224 MiB/s).  The context runs (other CPU, idle
    # owner) rotate after them, so they never sit between a judged pair.
    judged, context = plan[:2], plan[2:]
    for r in range(pairs):
        for item in (judged if r % 2 == 0 else judged[::-1]):
            run(*item, r)
        step()
    for r in range(config.repeats):
        k = r % len(context)
        for item in context[k:] + context[:k]:
            run(*item, r)
        step()
    missing = [k for k in ("ksm_tests", "ksmbench", "ksmbench-idle-owner") if not results[k]]
    if missing:
        return CrosscheckNotDone(f"no successful {', '.join(missing)} runs: "
                                 + (failures[0].error if failures else "nothing ran"),
                                 size, failures=tuple(failures))
    results = {k: v for k, v in results.items() if v}
    summ = {k: summarize([x.mib_per_s for x in v], "MiB/s") for k, v in results.items()}
    tlb = {k: [x.tlb_shootdowns for x in v if x.tlb_shootdowns is not None]
           for k, v in results.items()}
    cpu_time = {k: [x.ksmd_cpu_seconds for x in v if x.ksmd_cpu_seconds is not None]
                for k, v in results.items()}
    ours_s, theirs_s, idle_s = summ["ksmbench"], summ["ksm_tests"], summ["ksmbench-idle-owner"]
    medians_diff = relative_difference(ours_s.median, theirs_s.median)
    theirs_by_repeat = {x.repeat: x.mib_per_s for x in results["ksm_tests"]}
    paired = [x.mib_per_s / theirs_by_repeat[x.repeat] for x in results["ksmbench"]
              if x.repeat in theirs_by_repeat]
    # Judged on the median of the pairs' ratios: both runs of a pair see the
    # same machine, while the level of either drifts by +-20 % over a minute
    # (ksmd's share of the CPU it shares with the spinner), which the two
    # medians of 15 samples each do not average out reliably.
    paired_median = summarize(paired).median if paired else None
    diff = abs(paired_median - 1.0) if paired_median is not None else medians_diff
    other_cpu_ratio = None
    if "ksm_tests-other-cpu" in summ and "ksmbench-other-cpu" in summ:
        other_cpu_ratio = summ["ksmbench-other-cpu"].median / summ["ksm_tests-other-cpu"].median
    return CrosscheckResult(
        size_mib=size,
        ksm_tests=info,
        argv=(str(binary), "-P", "-s", str(size), "-p", str(tun.pages_to_scan)),
        tunables=tun,
        spinner_cpu=cpu,
        cpus=len(os.sched_getaffinity(0)),
        tunables_seen_ours=_merge_seen(o.tunables_seen for o in results["ksmbench"]),
        tunables_seen_ksm_tests=_merge_seen(t.tunables_seen for t in results["ksm_tests"]),
        tunables_seen_idle_owner=_merge_seen(t.tunables_seen for t in results["ksmbench-idle-owner"]),
        mib_per_s=summ,
        ours_mib_per_s=ours_s,
        ksm_tests_mib_per_s=theirs_s,
        idle_owner_mib_per_s=idle_s,
        tlb_shootdowns_median={k: (summarize(v).median if v else None) for k, v in tlb.items()},
        ksmd_cpu_seconds_median={k: (summarize(v, "s").median if v else None)
                                 for k, v in cpu_time.items()},
        ratio=ours_s.median / theirs_s.median,
        pairs=pairs,
        paired_ratio_median=paired_median,
        paired_ratios=tuple(paired),
        medians_relative_difference=medians_diff,
        idle_owner_ratio=idle_s.median / theirs_s.median,
        relative_difference=diff,
        tolerance=config.tolerance,
        agrees=diff <= config.tolerance,
        failures=tuple(failures),
        loadavg={k: [x.loadavg for x in v] for k, v in results.items()},
        other_cpu_ratio=other_cpu_ratio,
        method=METHOD)


#: how the cross-check is made, written with every result (the report quotes it)
METHOD = (
    "ksmbench 'the ksm_tests way' times the interval ksm_tests -P times: MADV_MERGEABLE + "
    "run=1 until full_scans has grown by 2, '*'-filled region owned by the timing "
    "process, which spins on full_scans. That spinning process is itself in ksmd's way, "
    "and how much depends on where ksmd runs: on the same CPU ksmd (nice 5, weight 335 "
    "against the spinner's 1024) gets about a quarter of it (measured: 0.25 of the wall "
    "time for both spinners), on another CPU every page "
    "ksmd write-protects or replaces costs a TLB-flush interrupt there (about 2 per "
    "page, /proc/interrupts), whose cost depends on what the spinner is doing. The "
    "verdict takes the same-CPU runs (the spinner is pinned to spinner_cpu, ksmd too) as "
    "adjacent pairs in alternating order and judges the median of the pairs' ratios; "
    "the other-CPU runs and ksmbench's own merge benchmark (owner asleep, ksmd "
    "free) are reported beside it.")


def _loadavg() -> float | None:
    """The 1-minute load average: how busy the shared machine was."""
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _merge_seen(items) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for seen in items:
        for k, vs in seen.items():
            out.setdefault(k, set()).update(vs)
    return {k: sorted(v) for k, v in out.items()}
