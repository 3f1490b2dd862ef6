"""A run's verdicts as JUnit XML (the schema Jenkins, GitLab and most CI
systems read): one ``<testsuite>`` per kernel, one ``<testcase>`` per
scenario; a mismatch is a ``<failure>`` listing the differing cells and the
failed ``expect`` checks, n/a is ``<skipped>``, a scenario that could not run
to its end is an ``<error>``."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from ..errors import os_boundary
from . import RunView, _kind


def junit_tree(view: RunView) -> ET.ElementTree:
    root = ET.Element("testsuites", name=f"ksmbench {view.run_id}")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    for kernel in view.kernels:
        cells = [c for c in view.cells if c.kernel == kernel]
        suite = ET.SubElement(root, "testsuite", name=kernel)
        counts = {"tests": len(cells), "failures": 0, "errors": 0, "skipped": 0}
        seconds = 0.0
        for cell in cells:
            case = ET.SubElement(suite, "testcase", classname=f"ksmbench.{kernel}",
                                 name=cell.scenario)
            if cell.seconds is not None:
                case.set("time", f"{cell.seconds:.3f}")
                seconds += cell.seconds
            kind = _kind(cell)
            if kind == "skip":
                counts["skipped"] += 1
                ET.SubElement(case, "skipped", message=cell.reason or "not applicable")
            elif kind == "error":
                counts["errors"] += 1
                ET.SubElement(case, "error", message=cell.reason or cell.verdict, type=cell.verdict)
            elif kind == "fail":
                counts["failures"] += 1
                failed = [e for e in cell.expects if not e.holds]
                lines = [f"step {e.step} {e.metric}: observed {e.observed or 'absent'}, expected "
                         f"{e.expected or 'absent'}" for e in failed]
                lines += [f"step {d.step}{' scan ' + str(d.scan) if d.scan else ''} {d.metric}: "
                          f"observed {d.observed or 'absent'}, predicted {d.predicted or 'absent'}"
                          for d in cell.differences]
                failure = ET.SubElement(case, "failure", type="mismatch",
                                        message=f"{len(cell.differences)} of {cell.compared} cells "
                                                f"differ from the prediction; {len(failed)} of "
                                                f"{len(cell.expects)} expect checks fail")
                failure.text = "\n".join(lines)
            out = [f"{cell.compared} cells compared with the prediction"]
            out += [f"expect step {e.step} {e.metric} = {e.expected or 'absent'}: "
                    f"{'holds' if e.holds else 'fails'}" for e in cell.expects]
            ET.SubElement(case, "system-out").text = "\n".join(out)
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
        suite.set("time", f"{seconds:.3f}")
        totals["time"] += seconds
    for key, value in totals.items():
        root.set(key, f"{value:.3f}" if key == "time" else str(value))
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(view: RunView, path: str | os.PathLike) -> None:
    with os_boundary(f"writing {path}"):
        junit_tree(view).write(path, encoding="utf-8", xml_declaration=True)
