"""Parsing what the KSM selftests print: KTAP, and the older "OK"/"Not OK".

KTAP (Documentation/dev-tools/ktap.rst, as printed by tools/testing/selftests/
kselftest.h)::

    TAP version 13
    1..9
    # [RUN] test_unmerge
    ok 1 Pages were unmerged
    ok 4 # SKIP UFFD_FEATURE_PAGEFAULT_FLAG_WP not available
    not ok 5 Merging memory failed# [RUN] test_prot_none
    # Totals: pass:8 fail:0 xfail:0 xpass:0 skip:1 error:0

Two things the parser must survive, both seen in real output:

* ksm_functional_tests reports "Merging memory failed" without a newline
  (``ksft_test_result_fail("Merging memory failed")`` in mmap_and_merge_range()),
  so the next ``# [RUN] test_...`` marker ends up on the same line.  Lines are
  split again at every ``# [RUN]`` / ``# Totals`` marker before parsing.
* A result's description is a message ("Pages were unmerged"), not the test's
  name; ksm_functional_tests names its tests only in the ``# [RUN] test_x``
  line before them.  A result takes the name of the last ``[RUN]`` marker.

ksm_tests before its KTAP conversion (6.1 has that version) prints "OK" or
"Not OK" and exits with KSFT_PASS (0), KSFT_FAIL (1) or KSFT_SKIP (4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: kselftest.h exit codes
KSFT_PASS, KSFT_FAIL, KSFT_XFAIL, KSFT_XPASS, KSFT_SKIP = 0, 1, 2, 3, 4

PASS, FAIL, SKIP, XFAIL, ERROR = "pass", "fail", "skip", "xfail", "error"

_MARKERS = re.compile(r"(?=# \[RUN\] )|(?=# Totals: )")
_RESULT = re.compile(r"^(?P<status>not ok|ok)\s+(?P<number>\d+)(?:\s+(?P<rest>.*))?$")
_DIRECTIVE = re.compile(r"(?:^|\s)#\s*(?P<kind>SKIP|XFAIL|TODO|TIMEOUT|ERROR)\b\s*(?P<why>.*)$",
                        re.IGNORECASE)
_RUN = re.compile(r"^# \[RUN\] (?P<name>\S+)")
_PLAN = re.compile(r"^1\.\.(?P<count>\d+)(?:\s*#\s*SKIP\s*(?P<why>.*))?$")
_TOTALS = re.compile(r"^# Totals: (?P<body>.*)$")


@dataclass
class TestResult:
    number: int | None
    name: str           #: the [RUN] name, else the description
    verdict: str        #: pass | fail | skip | xfail | error
    message: str        #: the description or the directive's reason
    #: the ``# ...`` lines printed while this test ran (its diagnostics)
    diagnostics: list[str] = field(default_factory=list)


@dataclass
class ParsedOutput:
    format: str                       #: "ktap", "legacy" or "none"
    results: list[TestResult]
    plan: int | None = None
    totals: dict[str, int] | None = None
    #: a whole-program skip ("1..0 # SKIP ...") or the legacy exit code 4
    skipped: str | None = None
    #: [RUN] markers that got no result line (a crash or a kill mid-test)
    unfinished: list[str] = field(default_factory=list)
    #: test numbers reported more than once: two processes wrote the stream (a
    #: forked child that returned into main() instead of exiting)
    repeated: list[int] = field(default_factory=list)


def split_lines(text: str) -> list[str]:
    """Lines, split again where a marker was glued to the previous output."""
    out: list[str] = []
    for line in text.splitlines():
        for part in _MARKERS.split(line):
            if part.strip():
                out.append(part.rstrip())
    return out


def parse_ktap(text: str) -> ParsedOutput:
    results: list[TestResult] = []
    plan = None
    totals = None
    skipped = None
    current: str | None = None        # name from the last [RUN] marker
    current_used = True               # has that marker's test reported yet?
    diagnostics: list[str] = []
    unfinished: list[str] = []
    for line in split_lines(text):
        stripped = line.strip()
        m = _RUN.match(stripped)
        if m:
            if current is not None and not current_used:
                unfinished.append(current)
            current, current_used = m["name"], False
            diagnostics = []
            continue
        m = _PLAN.match(stripped)
        if m:
            plan = int(m["count"])
            if m["why"] is not None:
                skipped = m["why"].strip() or "skipped"
            continue
        m = _TOTALS.match(stripped)
        if m:
            totals = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m["body"])}
            continue
        m = _RESULT.match(stripped)
        if m:
            rest = (m["rest"] or "").strip()
            verdict = PASS if m["status"] == "ok" else FAIL
            message = rest
            d = _DIRECTIVE.search(rest)
            if d:
                kind = d["kind"].upper()
                message = d["why"].strip() or rest[:d.start()].strip()
                if kind == "SKIP":
                    verdict = SKIP
                elif kind == "XFAIL":
                    verdict = XFAIL
                elif kind in ("TIMEOUT", "ERROR"):
                    verdict = ERROR
            name = current if current is not None and not current_used else (rest[:d.start()].strip()
                                                                              if d else rest)
            results.append(TestResult(int(m["number"]), name or f"test {m['number']}", verdict,
                                      message, diagnostics))
            current_used = True
            diagnostics = []
            continue
        if stripped.startswith("#"):
            diagnostics.append(stripped.lstrip("# ").rstrip())
    if current is not None and not current_used:
        unfinished.append(current)
    fmt = "ktap" if (results or plan is not None or "TAP version" in text) else "none"
    numbers = [r.number for r in results if r.number is not None]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    return ParsedOutput(fmt, results, plan, totals, skipped, unfinished, repeated)


def parse_legacy(text: str, returncode: int | None) -> ParsedOutput:
    """ksm_tests before KTAP: "OK" / "Not OK" lines and the exit code."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    said_ok = "OK" in lines
    said_not_ok = "Not OK" in lines
    if returncode == KSFT_SKIP:
        why = lines[-1] if lines else "skipped (exit 4)"
        return ParsedOutput("legacy", [TestResult(None, "", SKIP, why)], skipped=why)
    if said_not_ok or (returncode not in (None, KSFT_PASS) and not said_ok):
        why = next((ln for ln in lines if ln != "Not OK"), "Not OK") if said_not_ok else \
            f"exit status {returncode}"
        return ParsedOutput("legacy", [TestResult(None, "", FAIL, why)])
    if said_ok and returncode in (None, KSFT_PASS):
        return ParsedOutput("legacy", [TestResult(None, "", PASS, "OK")])
    return ParsedOutput("none", [])


def parse_output(text: str, returncode: int | None) -> ParsedOutput:
    """KTAP when the program speaks it, else the legacy format."""
    parsed = parse_ktap(text)
    if parsed.format == "ktap":
        return parsed
    return parse_legacy(text, returncode)
