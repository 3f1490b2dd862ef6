"""``ksmbench bench``: merge/unmerge/CoW speed, ksmd cost, memory savings, cross-check.

The arguments become one :class:`~ksmbench.bench.config.BenchConfig`, which
:func:`~ksmbench.bench.runner.run_benchmarks` runs.  For ``--kernel host`` the
benchmarks run here, holding the run lock.  For any other kernel the same
benchmarks run inside a VM of that kernel (``ksmbench bench --config <file>``,
the file holding the guest's configuration as JSON), and its run directory is
folded into this one, so every kernel's numbers come from the same code.

Exit status: 0 all done (and the ksm_tests cross-check, where it ran, agrees
within its tolerance); 1 the cross-check disagrees; 2 something could not be
measured (one line on stderr says what).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..backends import add_vm_options
from ..console import esc, make_console
from ..errors import KsmbenchError, os_boundary
from .config import PARTS, BenchConfig, parse_parts, parse_sizes
from .runner import run_benchmarks
from .summary import print_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ksmbench bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Benchmark KSM: how fast ksmd merges, what unmerging and copy-on-write breaks
cost, how much CPU ksmd spends per page, and how much memory is saved, seen
three ways. Also cross-checks the merge speed with the kernel's ksm_tests -P.
For a VM kernel the same benchmarks run inside the guest.""",
        epilog="""\
exit status:
  0  everything was measured (and the ksm_tests cross-check, where judged, agrees)
  1  the cross-check disagrees
  2  something could not be measured (one line on stderr says what)""")
    p.add_argument("--kernel", action="append", metavar="KERNEL",
                   help="host, debian:<major.minor>, or a kernel image path (repeatable; default: host)")
    p.add_argument("--out", default="results", help="parent of the run directory (default: results)")
    p.add_argument("--sizes", default=None, metavar="MIB,...",
                   help="region sizes for the timings (default: 16,64,256 on the host, 4,16 in a VM)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions of every measurement (default: 5)")
    p.add_argument("--only", default=",".join(PARTS), metavar="PART,...",
                   help=f"parts to run: {', '.join(PARTS)} (default: all)")
    p.add_argument("--pages-to-scan", type=int, default=1000,
                   help="pages_to_scan of free-running ksmd (merge timing and ksm_tests -p; default 1000)")
    p.add_argument("--savings-procs", type=int, default=4, help="processes in the savings workload")
    p.add_argument("--savings-mib", type=int, default=None,
                   help="MiB per process in the savings workload (default: 64 host, 8 VM)")
    p.add_argument("--savings-repeats", type=int, default=3,
                   help="repetitions of the savings workload per use_zero_pages value (default: 3)")
    p.add_argument("--crosscheck-mib", type=int, default=None,
                   help="size for the ksm_tests -P cross-check (default: 100 as run_vmtests.sh; 32 in a VM)")
    p.add_argument("--crosscheck-pairs", type=int, default=None, metavar="N",
                   help="back-to-back (ksm_tests -P, ksmbench) pairs judged by the cross-check "
                        "(default: 21 on the host, 5 in a VM)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="allowed relative difference to ksm_tests -P (default: 0.05)")
    p.add_argument("--ksm-tests", metavar="PATH",
                   help="a ksm_tests binary to use instead of building one from linux-source")
    p.add_argument("--source-series", default=None, metavar="X.Y",
                   help="linux-source series to build ksm_tests from (default: closest to the kernel)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run to finish instead of refusing")
    add_vm_options(p)
    p.add_argument("--guest-repeats", type=int, default=None, metavar="N",
                   help="repetitions inside VMs (default: --repeats); TCG guests are slow")
    p.add_argument("--guest-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="limit for the benchmarks inside one VM (default: 3600)")
    # set by the host when it runs this command inside a guest: everything
    # else comes from that file (BenchConfig.to_json)
    p.add_argument("--config", metavar="FILE", help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The configuration the command line asks for."""
    if args.config:
        with os_boundary(f"reading {args.config}"):
            return BenchConfig.from_json(Path(args.config).read_text())
    return BenchConfig(
        kernels=tuple(args.kernel or ["host"]), out=args.out,
        sizes_mib=parse_sizes(args.sizes) if args.sizes else None, repeats=args.repeats,
        parts=parse_parts(args.only), pages_to_scan=args.pages_to_scan,
        savings_procs=args.savings_procs, savings_mib=args.savings_mib,
        savings_repeats=args.savings_repeats, crosscheck_mib=args.crosscheck_mib,
        crosscheck_pairs=args.crosscheck_pairs, tolerance=args.tolerance, ksm_tests=args.ksm_tests,
        source_series=args.source_series, wait=args.wait, memory=args.memory, cpus=args.cpus,
        accel=args.accel, modules=args.modules, guest_repeats=args.guest_repeats,
        guest_timeout=args.guest_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    console = make_console(stderr=config.in_guest)
    run = run_benchmarks(config, console,
                         ["ksmbench", "bench", *(argv if argv is not None else sys.argv[2:])])
    # a guest's numbers are summarised by the host that started it
    status = 0 if config.in_guest else print_summary(console, run.results, config.tolerance)
    console.print(f"results: {esc(run.path)}")
    if run.failures:
        if len(config.kernels) == 1:
            raise KsmbenchError(run.failures[0])
        return 2
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
