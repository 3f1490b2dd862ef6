"""``ksmbench report RUNDIR [RUNDIR...]``: figures, one self-contained HTML file
and a markdown summary from run directories of ``ksmbench run`` and
``ksmbench bench``.

Writes ``<out>/report.html`` (opens offline: every figure is an embedded PNG),
``<out>/summary.md`` and ``<out>/figures/*.png``; ``--out`` defaults to
``<first RUNDIR>/report``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Sequence

from ..console import esc, make_console
from ..errors import os_boundary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ksmbench report", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Turn run directories of 'ksmbench run' and 'ksmbench bench' into figures, one
self-contained HTML file (it opens offline) and a markdown summary. A run that
was interrupted or failed is flagged as incomplete at the top.""",
        epilog="""\
writes:
  OUT/report.html, OUT/summary.md, OUT/figures/*.png

exit status:
  0  the report was written
  2  it could not be (one line on stderr says why)""")
    p.add_argument("rundirs", nargs="+", metavar="RUNDIR", help="run directories to report on")
    p.add_argument("--out", help="output directory (default: <first RUNDIR>/report)")
    p.add_argument("--title", default="ksmbench report", help="report title")
    p.add_argument("--dpi", type=int, default=110, help="figure resolution (default: 110)")
    p.add_argument("--format", choices=("html", "ktap"), default="html",
                   help="ktap: print the verdicts of `ksmbench run` directories as KTAP on "
                        "stdout instead of writing the HTML report")
    p.add_argument("--junit", metavar="FILE",
                   help="write the verdicts of `ksmbench run` directories as JUnit XML "
                        "instead of the HTML report")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.format == "ktap" or args.junit:
        return _ci_formats(args)

    console = make_console()
    out = Path(args.out) if args.out else Path(args.rundirs[0]) / "report"
    paths = generate(args.rundirs, out, title=args.title, dpi=args.dpi, console=console)
    for name, path in paths.items():
        console.print(f"{name}: {esc(path)}")
    return 0


def _ci_formats(args) -> int:
    """KTAP and JUnit from run directories (ksmbench.formats): the same text
    `ksmbench run --format ktap --junit FILE` gives; exit 1 if a verdict failed."""
    from ..formats import read_runs

    view = read_runs(args.rundirs)
    if args.junit:
        from ..formats.junit_out import write_junit

        write_junit(view, args.junit)
    if args.format == "ktap":
        from ..formats.ktap_out import render_ktap

        sys.stdout.write(render_ktap(view))
    counts = view.counts()
    return 1 if counts["fail"] or counts["error"] else 0


def generate(rundirs: Sequence[str | os.PathLike], out: Path, *, title: str = "ksmbench report",
             dpi: int = 110, console=None) -> dict[str, Path]:
    """Write the report; returns {"html": ..., "markdown": ..., "figures": ...}."""
    import matplotlib.pyplot as plt
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .document import build_sections, render_html, render_markdown
    from .figures import all_figures
    from .workload_savings import workload_savings_figures, workload_savings_section
    from .load import incomplete, load_runs

    data = load_runs(list(rundirs))
    if console is not None:  # first, and again at the top of the report
        for warning in incomplete(data):
            console.print(f"[bold yellow]warning:[/bold yellow] {esc(warning)}")
    fig_dir = out / "figures"
    with os_boundary(f"creating {fig_dir}"):
        fig_dir.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("[bold]report"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
                  console=console, transient=False, disable=console is None) as progress:
        task = progress.add_task("loading", total=None)
        # one figure per scenario: more than matplotlib's warning threshold of
        # 20 are open until they are rendered (and closed) just below
        with plt.rc_context({"figure.max_open_warning": 0}):
            figures = all_figures(data, progress=lambda n: progress.update(task, description=f"drawing {n}"),
                                  extra=(workload_savings_figures,))
        progress.update(task, total=len(figures) + 2, completed=0)
        pngs: dict[str, bytes] = {}
        for f in figures:
            progress.update(task, description=f"rendering {f.name}")
            buf = io.BytesIO()
            f.figure.savefig(buf, format="png", dpi=dpi)
            plt.close(f.figure)
            pngs[f.name] = buf.getvalue()
            with os_boundary(f"writing {fig_dir / f.name}.png"):
                (fig_dir / f"{f.name}.png").write_bytes(pngs[f.name])
            progress.update(task, advance=1)
        sections = build_sections(data, figures, extra=(workload_savings_section,))
        progress.update(task, description="writing summary.md")
        md_path = out / "summary.md"
        with os_boundary(f"writing {md_path}"):
            md_path.write_text(render_markdown(title, sections))
        progress.update(task, advance=1, description="writing report.html")
        html_path = out / "report.html"
        with os_boundary(f"writing {html_path}"):
            html_path.write_text(render_html(title, sections, pngs))
        progress.update(task, advance=1, description="done")
    return {"html": html_path, "markdown": md_path, "figures": fig_dir}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
