"""The two ways ``ksmbench savings`` runs: predict running pids, or start a
command, predict it and measure it (see :mod:`.measure` for what is read)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..kernel.features import kernel_release
from ..console import esc
from ..kernel.syscalls import PAGE_SIZE
from ..observation import absolute_levels, baseline_note
from ..results import RunDir
from .measure import (SavingsTable, churn_between, error_summary, measured_converged,
                      read_system, row_values, wall_at_tunables)
from .predict import Predictor, Tunables, profile_name
from .snapshot import Snapshotter

MIB = 1 << 20


def _snapshot(snap: Snapshotter, pids: Sequence[int], scope: str, console) -> tuple[list, float]:
    t0 = time.perf_counter()
    images = []
    for pid in pids:
        im = snap.snapshot(pid, scope)
        console.print(f"  pid {pid} ({im.name}): {im.pages * PAGE_SIZE / MIB:.1f} MiB of candidate "
                      f"pages in {len(im.areas)} VMAs ({im.scope}), {im.zero_pages()} zero-filled, "
                      f"read in {im.seconds:.2f} s")
        images.append(im)
    return images, time.perf_counter() - t0


def _predict(images, tunables: Tunables, profile: str, max_scans: int, console) -> Predictor:
    t0 = time.perf_counter()
    predictor = Predictor(images, tunables, profile)
    predictor.run(max_scans=max_scans)
    p = predictor.prediction
    f = p.final
    console.print(f"prediction ({profile}, {time.perf_counter() - t0:.2f} s): converges after scan "
                  f"{p.converged_scan}, saving {f.saved_pages() * PAGE_SIZE / MIB:.1f} MiB "
                  f"(pages_sharing {f.globals['pages_sharing']}, ksm_zero_pages "
                  f"{f.globals['ksm_zero_pages']}), general_profit "
                  f"{(f.globals['general_profit'] or 0) / MIB:.1f} MiB, about "
                  f"{p.seconds_to_converge():.1f} s at pages_to_scan={tunables.pages_to_scan}, "
                  f"sleep_millisecs={tunables.sleep_millisecs}")
    return predictor


def host_tunables(overrides: dict) -> Tunables:
    """The host's KSM tunables as they are when no ksmbench run holds them,
    overridden where the user chose.  A run in progress has its stepping
    values set; the values it will restore are in its undo journal."""
    from ..kernel.sysfs import KsmSysfs
    from ..kernel.tunables import Journal, journals

    sysfs = KsmSysfs()
    tunables = Tunables.from_host(sysfs)
    originals: dict[str, str] = {}
    for path in journals():
        record = Journal(path, str(sysfs.root)).read() or {}
        for name, value in record.get("originals", []):
            originals.setdefault(name, value)
    fields = {}
    for name in ("use_zero_pages", "max_page_sharing", "pages_to_scan", "sleep_millisecs",
                 "smart_scan"):
        if name in originals:
            try:
                fields[name] = int(originals[name])
            except ValueError:
                continue
    base = Tunables(**{**tunables.to_dict(), **fields})
    base = Tunables(use_zero_pages=bool(base.use_zero_pages), max_page_sharing=base.max_page_sharing,
                    pages_to_scan=base.pages_to_scan, sleep_millisecs=base.sleep_millisecs,
                    smart_scan=bool(base.smart_scan))
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return Tunables(**{**base.__dict__, **chosen})


def predict_pids(args, overrides: dict, console) -> int:
    from ..kernel.lock import RunLock

    profile = profile_name(args.profile)
    for pid in args.pid:
        if not Path(f"/proc/{pid}").exists():
            from .snapshot import ProcessGone

            raise ProcessGone(f"process {pid} does not exist", hint="check the pid with ps")
    tunables = host_tunables(overrides)
    rundir = RunDir(args.out, tables=False)
    meta = rundir.metadata
    meta.update({"command": "savings", "mode": "pid", "pids": args.pid,
                 "kernel_release": kernel_release(), "profile": profile,
                 "tunables": tunables.to_dict()})
    table = SavingsTable(rundir.path / "savings.csv")
    console.print(f"savings {rundir.run_id}: predicting {len(args.pid)} processes -> {rundir.path}")
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        with Snapshotter() as snap:
            images, snap_s = _snapshot(snap, args.pid, args.scope, console)
        predictor = _predict(images, tunables, profile, args.max_scans, console)
        p = predictor.prediction
        meta["snapshot_and_prediction_seconds"] = time.perf_counter() - t0
        meta["snapshot_and_prediction_cpu_seconds"] = time.process_time() - c0
        meta["snapshot_seconds"] = snap_s
        meta["prediction"] = p.summary()
        for sp in p.scans:
            table.add(sp.scan, row_values(sp, None, None, args.pid))
        table.add("final", row_values(p.final, None, None, args.pid))
    except BaseException as exc:
        meta["interrupted"] = type(exc).__name__
        raise
    finally:
        table.close()
        rundir.close()
    console.print(f"results: {rundir.path}")
    return 0


def measure_command(args, command: list[str], overrides: dict, console) -> int:
    from ..backends.host import HostSession
    from ..bench.probes import ksmd_cpu
    from ..kernel.lock import RunLock
    from .workload import Copies, Ready, check_exec_inheritance

    import shutil

    from .workload import WorkloadFailed

    ready = Ready.parse(args.ready, args.ready_timeout)
    if shutil.which(command[0]) is None:
        raise WorkloadFailed(f"cannot start '{command[0]}': no such command or not executable",
                             hint="give a command on PATH or a path to it")
    merge_any = not args.no_merge_any
    if merge_any:
        check_exec_inheritance()
    profile = profile_name(args.profile)
    with RunLock(timeout=args.wait):
        tunables = host_tunables(overrides)
        rundir = RunDir(args.out, tables=False)
        meta = rundir.metadata
        meta.update({"command": "savings", "mode": "command", "argv": command,
                     "copies": args.copies, "merge_any": merge_any, "ready": args.ready,
                     "kernel_release": kernel_release(), "profile": profile,
                     "tunables": tunables.to_dict(), "scope": args.scope})
        table = SavingsTable(rundir.path / "savings.csv")
        console.print(f"savings {rundir.run_id}: {args.copies} x {' '.join(command)} -> {rundir.path}")
        try:
            with HostSession() as session:
                meta["ksm_tunables_before"] = session.tunables_before
                if session.repair_message:
                    meta["repaired"] = session.repair_message
                _measure(args, command, tunables, profile, ready, merge_any, session, rundir,
                         table, console, ksmd_cpu(session.procfs, session.stepper.ksmd_pid),
                         Copies)
            meta["ksm_tunables_after"] = session.tunables_after
        except BaseException as exc:
            meta["interrupted"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            table.close()
            rundir.close()
    _print_summary(console, rundir.metadata)
    console.print(f"results: {rundir.path}")
    return 0


def _apply(session, tunables: Tunables) -> None:
    ch = session.changes
    ch.set("run", 2)  # max_page_sharing refuses changes while KSM pages exist
    if session.sysfs.has("use_zero_pages"):
        ch.set("use_zero_pages", int(tunables.use_zero_pages))
    ch.set("max_page_sharing", tunables.max_page_sharing)
    if session.sysfs.has("smart_scan"):  # 6.7+
        ch.set("smart_scan", int(tunables.smart_scan))
    session.stepper.prepared = False  # parked again before the first scan


def _measure(args, command, tunables, profile, ready, merge_any, session, rundir, table, console,
             ksmd, Copies) -> None:
    meta = rundir.metadata
    _apply(session, tunables)
    session.stepper.prepare()
    baseline = absolute_levels(session.sysfs.counters())  # KSM clean, no copy yet
    meta["counters_baseline"] = baseline
    note = baseline_note(baseline)
    if note:
        console.print(f"[yellow]{esc(note)}[/yellow]")
    with Copies(command, args.copies, rundir.path, merge_any=merge_any) as copies:
        pids = copies.pids
        meta["pids"] = pids
        console.print(f"started pids {', '.join(map(str, pids))}; waiting for {ready.describe()}")
        meta["ready_seconds"] = copies.wait_ready(ready)
        copies.check_alive("before the snapshot")
        session.policy.require_ksm_to_ourselves()  # the copies are our children
        _check_merge_any(session, pids, merge_any)
        with Snapshotter() as snap:
            t0, c0 = time.perf_counter(), time.process_time()
            images, snap_s = _snapshot(snap, pids, args.scope, console)
            base = read_system(session, pids, ksmd, baseline)
            base_cpu, base.ksmd_cpu = base.ksmd_cpu, 0.0
            predictor = _predict(images, tunables, profile, args.max_scans, console)
            meta["snapshot_seconds"] = snap_s
            meta["snapshot_and_prediction_seconds"] = time.perf_counter() - t0
            meta["snapshot_and_prediction_cpu_seconds"] = time.process_time() - c0
            p = predictor.prediction
            meta["prediction"] = p.summary()
            rundir.write_metadata()
            table.add(0, row_values(None, base, base, pids, template=p.at(1)))
            readings = [base]
            pages = sum(im.pages for im in images)
            want = max(p.converged_scan or 0, 2) + 1
            scan = 0
            while scan < args.max_scans:
                scan += 1
                copies.check_alive(f"during scan {scan}")
                session.policy.require_ksm_to_ourselves()
                session.stepper.scan(pages_hint=pages, label="savings")
                r = read_system(session, pids, ksmd, baseline)
                r.ksmd_cpu = (r.ksmd_cpu - base_cpu
                              if r.ksmd_cpu is not None and base_cpu is not None else None)
                readings.append(r)
                predictor.ensure(scan)
                row = row_values(predictor.prediction.at(scan), r, base, pids)
                cpu_prev = readings[-2].ksmd_cpu
                if r.ksmd_cpu is not None and cpu_prev is not None:
                    row["ksmd_cpu_seconds"] = (row["ksmd_cpu_seconds"][0], r.ksmd_cpu - cpu_prev)
                table.add(scan, row)
                c = r.counted
                console.print(f"  scan {scan}: pages_sharing {c.get('pages_sharing')} "
                              f"(predicted {predictor.prediction.at(scan).globals['pages_sharing']}), "
                              f"ksm_zero_pages {c.get('ksm_zero_pages')} "
                              f"(predicted {predictor.prediction.at(scan).globals['ksm_zero_pages']})")
                if scan == 1:
                    _check_scanned(r, pids, merge_any)
                if scan >= want and measured_converged(readings) is not None:
                    break
            mconv = measured_converged(readings)
            meta["measured_converged_scan"] = mconv
            meta["scans_stepped"] = scan
            last = readings[-1]
            final = p.final
            frow = row_values(final, last, base, pids)
            frow.pop("ksmd_cpu_seconds", None)
            table.add("final", frow)
            meta["error_at_convergence"] = error_summary(final, last, pids)
            conv = mconv or scan
            meta["ksmd_cpu_seconds_to_converge"] = (readings[conv].ksmd_cpu
                                                    if readings[conv].ksmd_cpu is not None else None)
            meta["seconds_to_converge_predicted"] = p.seconds_to_converge()
            meta["seconds_to_converge_from_measured_cpu"] = wall_at_tunables(readings, conv, tunables)
            # churn: read every page again, after convergence
            console.print("re-reading the pages after convergence (churn)")
            after, _ = _snapshot(snap, pids, args.scope, _Quiet())
            churn = churn_between(images, after)
            meta["churn"] = churn.to_dict()
            rundir.write_metadata()


class _Quiet:
    def print(self, *_a, **_k) -> None:
        pass


def _check_merge_any(session, pids, merge_any: bool) -> None:
    """Every copy must carry MMF_VM_MERGE_ANY after exec (ksm_stat, 6.14+)."""
    if not merge_any:
        return
    from ..errors import KsmUnavailable

    for pid in pids:
        stat = session.procfs.ksm_stat(pid)
        if stat.get("ksm_merge_any") == 0:
            raise KsmUnavailable(
                f"pid {pid} lost PR_SET_MEMORY_MERGE at exec: this kernel does not carry "
                "merge-any across exec (3c6f33b7273a, 6.7)",
                hint="use --no-merge-any for programs that mark memory mergeable themselves")


def _check_scanned(reading, pids, merge_any: bool) -> None:
    """After scan 1 every copy with candidate pages has rmap items; none means
    ksmd never registered the exec'd mm (before 3a9e567ca45f, 6.10)."""
    from ..errors import KsmUnavailable

    for pid in pids:
        items = reading.procs.get(pid, {}).get("ksm_rmap_items")
        if items == 0:
            why = ("this kernel does not register an exec'd merge-any process with ksmd "
                   "(needs 3a9e567ca45f, 6.10)" if merge_any else
                   "the program marked no memory mergeable")
            raise KsmUnavailable(f"ksmd did not scan pid {pid} in its first full scan: {why}")


def _print_summary(console, meta: dict[str, Any]) -> None:
    e = meta.get("error_at_convergence")
    if not e:
        return
    from rich.table import Table

    t = Table(title="at convergence: predicted vs measured")
    for col in ("metric", "predicted", "measured", "error"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    t.add_row("saved MiB (pages_sharing + ksm_zero_pages)",
              f"{e['predicted_saved_bytes'] / MIB:.2f}", f"{e['measured_saved_bytes'] / MIB:.2f}",
              _pct(e["saved_error_pct"]))
    for name in ("pages_shared", "pages_sharing", "ksm_zero_pages"):
        t.add_row(name, str(e[f"{name}_predicted"]), str(e[f"{name}_measured"]), "")
    t.add_row("general_profit", "", "", _pct(e["general_profit_error_pct"]))
    for pid, err in e["per_process_profit_error_pct"].items():
        t.add_row(f"pid {pid} ksm_process_profit", "", "", _pct(err))
    console.print(t)
    ch = meta.get("churn", {})
    console.print(f"churn since the snapshot: {ch.get('pages', 0)} pages changed or gone "
                  f"({ch.get('bytes', 0) / MIB:.2f} MiB), {ch.get('new', 0)} new; "
                  f"converged after scan {meta.get('measured_converged_scan')} "
                  f"(predicted {meta.get('prediction', {}).get('converged_scan')}); ksmd CPU to "
                  f"converge {meta.get('ksmd_cpu_seconds_to_converge') or 0:.2f} s; "
                  f"snapshot + prediction {meta.get('snapshot_and_prediction_seconds', 0):.2f} s")


def _pct(v) -> str:
    return "" if v is None else f"{v:+.2f} %"
