"""The v1 scenario format: model, loading/validation, patterns, built-in sets.

Every built-in scenario is a TOML file shipped as package data, in one of
three sets (directories of this package): ``suite`` (``ksmbench run``'s
default), ``peers`` (the kernel selftests' counterparts that no suite
scenario covers, :mod:`ksmbench.selftests.catalogue`) and ``probes``
(``ksmbench identify``'s extra scenarios).  :func:`builtin_set` loads one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import ScenarioError
from .loader import load_scenario, parse_scenario
from .model import Scenario

__all__ = ["Scenario", "load_scenario", "parse_scenario", "builtin_set", "builtin_suite",
           "builtin_names", "resolve_scenarios", "BUILTIN_SETS"]

#: the built-in sets: one package-data directory of ``<name>.toml`` files each
BUILTIN_SETS = ("suite", "peers", "probes")


def _set_dir(kind: str):
    if kind not in BUILTIN_SETS:
        raise ValueError(f"no built-in scenario set {kind!r} (sets: {', '.join(BUILTIN_SETS)})")
    return resources.files(__package__) / kind


def builtin_names(kind: str = "suite") -> list[str]:
    return sorted(p.name[:-5] for p in _set_dir(kind).iterdir() if p.name.endswith(".toml"))


def builtin(name: str, kind: str = "suite") -> Scenario:
    entry = _set_dir(kind) / f"{name}.toml"
    if not entry.is_file():
        raise ScenarioError(name, "no such built-in scenario "
                            f"(built-in: {', '.join(builtin_names(kind))})")
    return parse_scenario(entry.read_text(encoding="utf-8"), source=f"<{kind}>/{name}.toml")


def builtin_set(kind: str) -> list[Scenario]:
    """Every scenario of one built-in set, in name order."""
    return [builtin(name, kind) for name in builtin_names(kind)]


def builtin_suite() -> list[Scenario]:
    return builtin_set("suite")


def resolve_scenarios(args: list[str]) -> list[Scenario]:
    """Scenario arguments -> scenarios.  No arguments: the whole built-in suite.

    An argument is a file path, a directory of ``*.toml`` files, or the name
    of a built-in scenario.  ``scenarios/<name>.toml`` that does not exist as a
    file names the built-in scenario ``<name>``, so the README's examples work
    from any directory.
    """
    if not args:
        return builtin_suite()
    out: list[Scenario] = [load_source(source) for arg in args for source in scenario_sources(arg)]
    seen: set[str] = set()
    for s in out:
        if s.name in seen:
            raise ScenarioError(s.source, f"scenario name '{s.name}' appears twice in this run",
                                field="name")
        seen.add(s.name)
    return out


#: the named set of LTP ksm01/ksm06/ksm07 restatements (``ksmbench run ltp``);
#: kept out of the built-in suite because ksm07's expectations need 6.7
LTP_SET = "ltp"
#: the named set of scenarios that bind regions to NUMA node 1
#: (``ksmbench run numa``): not applicable on a one-node kernel, so kept out
#: of the suite; a guest boots with as many nodes as they need
NUMA_SET = "numa"
#: the named set of scan-time advisor scenarios whose later scans are exact
#: only where ksmd uses under 10 ms of CPU per scan (this host; not a TCG
#: guest): ``ksmbench run advisor``.  The suite has advisor-batches, exact anywhere
ADVISOR_SET = "advisor"
#: named sets: a package-data directory each, run by name
NAMED_SETS = (LTP_SET, NUMA_SET, ADVISOR_SET)


def named_set_dir(name: str) -> Path:
    return Path(str(resources.files(__package__) / name))


def ltp_set_dir() -> Path:
    return named_set_dir(LTP_SET)


def scenario_sources(arg: str) -> list[Path | str]:
    """What one scenario argument names: scenario files (a directory's
    ``*.toml`` in name order, or the file itself), a built-in name, or a
    named set (``ltp``, ``numa``, ``advisor``)."""
    if arg in NAMED_SETS and not Path(arg).exists():
        return sorted(named_set_dir(arg).glob("*.toml"))
    path = Path(arg)
    if path.is_dir():
        files = sorted(path.glob("*.toml"))
        if not files:
            raise ScenarioError(arg, "directory holds no *.toml scenario files")
        return list(files)
    if path.exists():
        return [path]
    if path.suffix == ".toml" and path.stem in builtin_names():
        return [path.stem]
    if path.suffix != ".toml" and arg in builtin_names():
        return [arg]
    raise ScenarioError(arg, "no such file, and no built-in scenario of that name "
                        f"(built-in: {', '.join(builtin_names())})")


def load_source(source: Path | str) -> Scenario:
    """Load what :func:`scenario_sources` returned: a file path or a built-in name."""
    return load_scenario(source) if isinstance(source, Path) else builtin(source)

