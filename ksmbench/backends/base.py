"""The one contract every backend keeps; the Runner relies on nothing else.

A backend is where scenarios run: the host kernel (:mod:`.host`), a kernel in
QEMU (:mod:`.vm`), the emulator (:mod:`ksmbench.emulator.backend`), or a
recorded stream played back (``ksmbench validate``'s cache).  Every one of
them has every member below, so no caller asks whether a backend has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Generator, Mapping, Protocol, Sequence, runtime_checkable

from ..observation import Event
from ..scenario import model as m


@runtime_checkable
class Backend(Protocol):
    #: the kernel column of the results (``host``, ``debian:6.12``, ``emulator:linux-6.6``)
    label: str
    #: the KSM tunables as the backend restored them on *this* machine once its
    #: stream ended, cut short or not ({} when it changes none here: a guest's
    #: tunables come in its BackendInfo, the emulator has none).  The Runner
    #: records them when a run is interrupted before the stream could say so.
    tunables_after: Mapping[str, str]

    def preflight(self) -> None:
        """Refuse now, in one line, what cannot run (no root, an unknown Debian
        series, a missing image): before locks, run directories and progress
        bars.  Does nothing where everything can run."""
        ...

    def events(self, scenarios: Sequence[m.Scenario], *,
               artifacts_dir: Path | None = None) -> Generator[Event, None, None]:
        """Run ``scenarios`` and yield the event stream (:mod:`ksmbench.observation`).

        ``artifacts_dir``: where the backend may keep files worth reading after
        the run (a guest's console log and raw event stream); None: nowhere in
        particular.  A generator, so the Runner can end it (and with it a VM
        or a host session) the moment it stops reading."""
        ...
