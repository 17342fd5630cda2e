"""Atomic output: a run writes into a hidden folder beside the destination and swaps it into place only at the end.

A failed run's files go to `<out>.failed/` for inspection; an interrupted run removes its temporary folder; in
neither case is an earlier good output touched.

Ctrl-C needs care here. CPython turns SIGINT into a KeyboardInterrupt raised in whatever Python code runs next, and
when that code is a finalizer or a weakref callback (one runs each time the collector frees an onnxruntime session,
a torch module or a WeakKeyDictionary entry), the exception is printed as "Exception ignored in ..." and the run
carries on. Measured by sending SIGINT at random moments to a tiny export: one run in 40 published its model and
exited 0 after Ctrl-C that way. So while a `Staging` is open, SIGINT is also written down, and `publish` refuses to
swap once one was received. SIGTERM (what `kill` and a CI job's timeout send) is handled the same way: by default
it ends the process at once and left the staging folder behind (GBs for a 7B export).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from exporter.errors import UsageError

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def failed_path(destination: Path) -> Path:
    """Where a run that failed validation leaves its files."""
    return destination.with_name(destination.name + ".failed")


def check_destination(destination: Path) -> None:
    """Fail before any work if the output cannot be written where asked."""
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"--out {destination}: is a file; choose a folder path")
    parent = destination.parent
    existing = next((p for p in [parent, *parent.parents] if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--out {destination}: {existing} is not a writable folder; choose another --out")


class Staging:
    """The temporary folder a run writes into (`folder`), removed on exit unless it was published."""

    def __init__(self, destination: Path):
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
        self.interrupted = False
        self._committed = False
        self._previous_handlers: dict[signal.Signals, object] = {}

    def __enter__(self) -> Staging:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous_handlers = {signum: signal.signal(signum, self._on_interrupt) for signum in INTERRUPTS}
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _on_interrupt(self, signum: int, frame: object) -> None:
        self.interrupted = True
        if not self._committed:  # once the swap has begun, stopping it halfway is the one thing worse than going on
            raise KeyboardInterrupt

    def empty(self) -> None:
        """Start the folder over (a second plan replaces the first one's files)."""
        shutil.rmtree(self.folder)
        self.folder.mkdir()

    def publish(self, destination: Path) -> None:
        """Swap the finished folder into place; the old one is only removed once the new one is there."""
        if self.interrupted:  # Ctrl-C came while a finalizer ran and was swallowed there: still honour it
            raise KeyboardInterrupt
        self._committed = True  # an interrupt from here on is recorded, not raised
        old = None
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, old)
        os.replace(self.folder, destination)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
