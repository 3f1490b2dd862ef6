"""The one undo mechanism for KSM tunables, with an on-disk journal.

Every write to /sys/kernel/mm/ksm goes through :class:`TunableChanges`
(modelled on pytest's monkeypatch): the first change of a tunable records its
previous value, in memory and in a journal file (fsync'd before the write), and
:meth:`TunableChanges.restore` writes every previous value back, on success,
on exceptions, on Ctrl-C and on SIGTERM (turned into an exception by
:func:`signals_as_exceptions`).  A SIGKILL cannot be caught: the journal stays
behind, and the next invocation's :func:`repair` restores what it records and
says so.

Each undo stack has its own journal file, so stacks may nest (a pytest fixture
holding tunables while a host session changes more) without overwriting each
other; after a SIGKILL, :func:`repair` undoes the dead stacks newest first,
which is the order the stacks would have restored themselves.

The journals live in ``$KSMBENCH_STATE_DIR`` (default ``/run/ksmbench``).
``/run`` is a tmpfs: after a reboot the tunables are back at their defaults and
the journal is gone with them, which is exactly right.  A journal from an
earlier boot (its boot_id differs) is discarded, never applied.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import KsmbenchError, KernelIOError, os_boundary
from .procfs import ProcFS
from .sysfs import KsmSysfs

#: journal files: tunables.<pid>.<n>.journal.json, one per undo stack
JOURNAL_GLOB = "tunables.*.journal.json"
_stack_numbers = itertools.count(1)
#: tunables that the kernel refuses to change while KSM pages exist (-EBUSY)
_NEED_NO_KSM_PAGES = ("max_page_sharing", "merge_across_nodes")


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an exception so that cleanup code runs."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Raise :class:`Terminated` on SIGTERM and KeyboardInterrupt on SIGINT.

    SIGINT gets its handler explicitly: Python installs its own only when
    SIGINT was not inherited as ignored, and a job started with ``&`` from a
    non-interactive shell (CI, nohup, a script) inherits it ignored.  A
    ``kill -INT`` from a supervisor must still stop the run cleanly, with the
    tunables restored and the results so far kept.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous_term = signal.signal(signal.SIGTERM, handler)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be put back
        signal.signal(signal.SIGINT, previous_int if previous_int is not None else signal.SIG_DFL)
        signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)


def state_dir() -> Path:
    return Path(os.environ.get("KSMBENCH_STATE_DIR", "/run/ksmbench"))


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed run whose parent never reaps it (a container's init) stays a
    # zombie: it answers kill(0) but will never undo its journal.
    try:
        state = ProcFS().task_state(pid)
    except KsmbenchError:
        return True
    return state not in ("Z", "X")


class Journal:
    """What a run changed, on disk, so that a killed run can be repaired."""

    def __init__(self, path: Path, sysfs_root: str):
        self.path = path
        self.sysfs_root = sysfs_root

    def write(self, originals: list[tuple[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not hasattr(self, "_created"):
            self._created = time.time()
        record = {
            "pid": os.getpid(),
            "boot_id": boot_id(),
            "sysfs": self.sysfs_root,
            "created_at": self._created,
            "written_at": time.time(),
            "originals": originals,
        }
        tmp = self.path.with_suffix(".tmp")
        with os_boundary(f"writing the tunables journal {self.path}"):
            with open(tmp, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"corrupt": True}

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class TunableChanges:
    """Undo stack for KSM tunables (use as a context manager)."""

    def __init__(self, sysfs: KsmSysfs, journal_dir: Path | None = None):
        self.sysfs = sysfs
        name = f"tunables.{os.getpid()}.{next(_stack_numbers)}.journal.json"
        self.journal = Journal((journal_dir or state_dir()) / name, str(sysfs.root))
        #: (name, previous value) in the order of first change
        self.originals: list[tuple[str, str]] = []
        self._saved: set[str] = set()

    def __enter__(self) -> "TunableChanges":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @property
    def changed(self) -> bool:
        return bool(self.originals)

    def set(self, name: str, value: str | int | bool) -> None:
        """Write a tunable, remembering its previous value first."""
        text = str(int(value)) if isinstance(value, bool) else str(value)
        current = self.sysfs.tunable(name)
        if current is None:
            raise KernelIOError(f"setting KSM tunable {name}: this kernel has no "
                                f"{self.sysfs.root / name}", None)
        if name not in self._saved:
            self.originals.append((name, current))
            self._saved.add(name)
            self.journal.write(self.originals)
        if current != text:
            _write(self.sysfs, name, text)

    def get(self, name: str) -> str | None:
        return self.sysfs.tunable(name)

    def restore(self) -> None:
        """Write back every previous value; the journal goes once all are back."""
        if not self.originals:
            self.journal.remove()
            return
        restore_values(self.sysfs, self.originals)
        self.originals = []
        self._saved = set()
        self.journal.remove()


def _write(sysfs: KsmSysfs, name: str, text: str) -> None:
    path = sysfs.root / name
    with os_boundary(f"writing {text} to {path}"):
        with open(path, "w") as f:
            f.write(text)


def restore_values(sysfs: KsmSysfs, originals: list[tuple[str, str]]) -> None:
    """Put tunables back, in an order the kernel accepts.

    * ``run`` goes last, so that a previously running ksmd restarts with its
      own settings, and first becomes 2 if a tunable needs it: the kernel
      refuses max_page_sharing and merge_across_nodes with -EBUSY while KSM
      pages exist (mm/ksm.c, max_page_sharing_store()).
    * Others go back in reverse order of change: advisor_mode (6.8) was
      switched to "none" before pages_to_scan was written, so pages_to_scan
      is restored while the advisor still lets it be written.
    """
    failures: list[str] = []
    run_original = None
    for name, value in reversed(originals):
        if name == "run":
            run_original = value
            continue
        if sysfs.tunable(name) == value:
            continue
        try:
            _write(sysfs, name, value)
        except KernelIOError as exc:
            if exc.errno == errno.EBUSY and name in _NEED_NO_KSM_PAGES:
                _write(sysfs, "run", "2")
                _write(sysfs, name, value)
            else:
                failures.append(f"{name}={value} ({exc.message})")
        except KsmbenchError as exc:
            failures.append(f"{name}={value} ({exc.message})")
    if run_original is not None and sysfs.tunable("run") != run_original:
        _write(sysfs, "run", run_original)
    wrong = [f"{n} is {sysfs.tunable(n)}, was {v}" for n, v in originals
             if n != "advisor_mode" and sysfs.tunable(n) != v
             and not (n == "pages_to_scan" and sysfs.tunable("advisor_mode") == "scan-time")]
    if failures or wrong:
        raise KernelIOError("restoring KSM tunables: " + "; ".join(failures + wrong), None,
                            hint=f"set them by hand in {sysfs.root}")


def journals(journal_dir: Path | None = None) -> list[Path]:
    """Every journal file in the state directory."""
    directory = journal_dir or state_dir()
    try:
        return sorted(directory.glob(JOURNAL_GLOB))
    except OSError:
        return []


def repair(sysfs: KsmSysfs, journal_dir: Path | None = None) -> str | None:
    """Restore what killed runs left changed; returns a message, or None.

    Journals of live processes (this one included) are left alone: their
    stacks will restore themselves.  Dead ones are undone newest first.
    """
    messages: list[str] = []
    dead: list[tuple[float, Journal, dict]] = []
    for path in journals(journal_dir):
        journal = Journal(path, str(sysfs.root))
        record = journal.read()
        if record is None:
            continue
        if record.get("corrupt"):
            journal.remove()
            messages.append(f"discarded an unreadable tunables journal ({path})")
            continue
        if record.get("boot_id") != boot_id():
            journal.remove()
            messages.append("discarded a tunables journal from an earlier boot "
                            "(the tunables reset at boot)")
            continue
        pid = int(record.get("pid", 0))
        if pid == os.getpid() or (pid and pid_alive(pid)):
            continue  # a live stack: it restores itself (the run lock keeps us apart)
        dead.append((float(record.get("created_at", record.get("written_at", 0))), journal, record))
    for _, journal, record in sorted(dead, key=lambda item: item[0], reverse=True):
        originals = [tuple(item) for item in record.get("originals", [])]
        restore_values(KsmSysfs(record.get("sysfs", str(sysfs.root))), originals)
        journal.remove()
        shown = ", ".join(f"{n}={v}" for n, v in originals)
        messages.append(f"restored KSM tunables that ksmbench (pid {record.get('pid')}) left "
                        f"changed when it was killed: {shown}")
    return "; ".join(messages) or None
