"""A run's verdicts as KTAP version 1 (Documentation/dev-tools/ktap.rst), in
the kselftest style of tools/testing/selftests/kselftest/ktap_helpers.sh.

* One top-level test per scenario x kernel, named ``<scenario> [<kernel>]``.
* Its subtests, indented by two spaces under their own ``KTAP version 1``
  line, ``# Subtest:`` line and plan: one per ``expect`` check (``ok`` when it
  holds), then one ``not ok`` per cell that differs from the emulator's
  prediction, or a single ``ok`` saying how many cells were compared, all
  equal.  The observed and expected values go in a ``#`` diagnostic line
  before a failed subtest, as kselftest prints its messages.
* ``ok N name # SKIP reason`` for a scenario that is n/a on the kernel;
  ``not ok N name # ERROR reason`` for one that could not run to its end.
* ``# Totals: pass:P fail:F xfail:0 xpass:0 skip:S error:E`` at the end, as
  ktap_print_totals() prints it.
"""

from __future__ import annotations

import re

from . import Cell, RunView, _kind

INDENT = "  "


def _text(text: object) -> str:
    """A description or reason on one line, without '#' (which starts a directive)."""
    return re.sub(r"\s+", " ", str(text).replace("#", "no.")).strip()


def test_name(cell: Cell) -> str:
    return _text(f"{cell.scenario} [{cell.kernel}]")


def _subtests(cell: Cell) -> list[tuple[bool, str, str | None]]:
    """(passed, description, diagnostic) of each subtest of one cell."""
    out: list[tuple[bool, str, str | None]] = []
    for e in cell.expects:
        desc = f"expect step {e.step} {e.metric} = {e.expected or 'absent'}"
        diag = None if e.holds else f"observed {e.observed or 'absent'}, expected {e.expected or 'absent'}"
        out.append((e.holds, desc, diag))
    for d in cell.differences:
        where = f"step {d.step}" + (f" scan {d.scan}" if d.scan else "")
        out.append((False, f"prediction {where} {d.metric}",
                    f"observed {d.observed or 'absent'}, predicted {d.predicted or 'absent'}"))
    if cell.compared and not cell.differences:
        out.append((True, f"prediction: {cell.compared} cells compared, all equal", None))
    return out


def render_ktap(view: RunView) -> str:
    lines = ["KTAP version 1", f"1..{len(view.cells)}",
             f"# ksmbench run {view.run_id}: {len(view.scenarios)} scenarios x "
             f"{len(view.kernels)} kernels"]
    for number, cell in enumerate(view.cells, 1):
        name = test_name(cell)
        kind = _kind(cell)
        if kind != "skip":
            subs = _subtests(cell)
            if subs:
                lines += [INDENT + "KTAP version 1", f"{INDENT}# Subtest: {name}",
                          f"{INDENT}1..{len(subs)}"]
                for n, (passed, desc, diag) in enumerate(subs, 1):
                    if diag:
                        lines.append(f"{INDENT}# {_text(diag)}")
                    lines.append(f"{INDENT}{'ok' if passed else 'not ok'} {n} {_text(desc)}")
        if kind == "skip":
            lines.append(f"ok {number} {name} # SKIP {_text(cell.reason or 'not applicable')}")
        elif kind == "error":
            lines.append(f"not ok {number} {name} # ERROR {_text(cell.reason or cell.verdict)}")
        elif kind == "fail":
            lines.append(f"# {name}: {len(cell.differences)} cells differ from the prediction, "
                         f"{sum(1 for e in cell.expects if not e.holds)} expect checks fail")
            lines.append(f"not ok {number} {name}")
        else:
            lines.append(f"ok {number} {name}")
    c = view.counts()
    lines.append(f"# Totals: pass:{c['pass']} fail:{c['fail']} xfail:0 xpass:0 "
                 f"skip:{c['skip']} error:{c['error']}")
    return "\n".join(lines) + "\n"
