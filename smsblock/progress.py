"""Progress reporting and cancellation, shared by long operations.

Long operations (convert, scan, replicate, restore, verify) take two optional keyword
arguments:

* ``progress``: a callable ``progress(done, total)`` in bytes, called from the
  operation's thread now and then (at most every few MiB), ``done`` never decreasing
  within a phase. A callable that also takes a ``phase`` keyword (or ``**kwargs``) is
  told which phase the bytes belong to: one of :data:`PHASES` (``reading`` the source
  disk, ``storing`` blocks and the run's manifest, ``uploading`` to a cloud, ``converting``
  to an image file, ``verifying``, ``pruning``); ``done`` and ``total`` start again with
  each phase. Two-argument callables are called as before;
* ``cancel``: a :class:`CancelToken`; once cancelled, the operation stops at the next
  safe point, leaves everything it writes valid, and raises :class:`~smsblock.errors.Cancelled`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import inspect
from typing import Callable, Iterator

from .errors import Cancelled

ProgressCallback = Callable[[int, int], None]

PHASES = ("reading", "storing", "uploading", "converting", "verifying", "pruning")


class _Phased:
    """``progress(done, total)`` of one phase, handing the phase on to a callback that
    takes it."""

    __slots__ = ("callback", "phase", "_takes_phase")

    def __init__(self, callback, phase: str, takes_phase: bool):
        self.callback, self.phase, self._takes_phase = callback, phase, takes_phase

    def __call__(self, done: int, total: int) -> None:
        if self._takes_phase:
            self.callback(done, total, phase=self.phase)
        else:
            self.callback(done, total)


def _takes_phase(callback) -> bool:
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):       # builtins and C callables: the two-argument kind
        return False
    return any(p.name == "phase" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
               or p.kind is p.VAR_KEYWORD for p in params)


def with_phase(progress, phase: str):
    """``progress`` as a two-argument callback of ``phase`` (None stays None); wrapping a
    callback of another phase moves it to this one."""
    if progress is None:
        return None
    if phase not in PHASES:
        raise ValueError(f"unknown progress phase {phase!r}")
    if isinstance(progress, _Phased):
        return _Phased(progress.callback, phase, progress._takes_phase)
    return _Phased(progress, phase, _takes_phase(progress))


class CancelToken:
    """Thread-safe cancellation flag: ``cancel()`` from anywhere, ``check()`` in the work."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until cancelled or ``timeout`` seconds passed; True when cancelled."""
        return self._event.wait(timeout)


def check_cancel(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


class ThreadSafeProgress:
    """Adds up byte counts from several worker threads and reports the running total."""

    def __init__(self, callback: ProgressCallback | None, total: int):
        self._callback = callback
        self.total = total
        self.done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self._callback is None:
            return
        with self._lock:
            self.done += nbytes
            done = min(self.done, self.total)
            self._callback(done, self.total)


def human_size(n: int) -> str:
    """``10485760`` → ``10 MiB``: binary units, named as such; exact units stay short,
    others get one decimal."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class _Bar:
    """One status line on stderr: ``PHASE  42%  1.2 GiB / 3.0 GiB  85.3 MiB/s  ETA 0:21``."""

    def __init__(self, phase: str, stream, interval: float = 0.2):
        self.phase, self.stream, self.interval = phase, stream, interval
        self.current: str | None = None      # the operation's phase, when it says
        self.started = time.monotonic()
        self.last = 0.0
        self.width = 0
        self.lock = threading.Lock()

    def line(self, done: int, total: int, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        pct = f"{100 * done // total:3d}%" if total else "  ?%"
        eta = ""
        if total and rate > 0 and done < total:
            left = int((total - done) / rate)
            eta = f"  ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        what = f"{self.phase} ({self.current})" if self.current else self.phase
        return (f"{what}  {pct}  {human_size(done)} / {human_size(total)}  "
                f"{human_size(int(rate))}/s{eta}")

    def update(self, done: int, total: int, phase: str | None = None) -> None:
        with self.lock:
            now = time.monotonic()
            if phase is not None and phase != self.current:     # a new phase starts over
                self.current, self.started, self.last = phase, now, 0.0
            if now - self.last < self.interval and done < total:
                return
            self.last = now
            text = self.line(done, total, now)
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            self.stream.flush()

    def close(self) -> None:
        with self.lock:
            if self.width:      # leave the terminal clean: the command prints its result
                self.stream.write("\r" + " " * self.width + "\r")
                self.stream.flush()


@contextlib.contextmanager
def terminal_progress(description: str, enabled: bool | None = None) -> Iterator[ProgressCallback | None]:
    """A progress callback that shows one line on a terminal: the phase (``description``,
    e.g. ``replicate web-01: scan and store``), percent, bytes in binary units (KiB, MiB,
    GiB), throughput and ETA.

    Yields ``None`` when stderr is not a terminal (or ``enabled`` is False), so scripts
    and logs stay clean.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    bar = _Bar(description, sys.stderr)
    try:
        yield bar.update
    finally:
        bar.close()
