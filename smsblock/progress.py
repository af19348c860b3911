"""Progress reporting and cancellation, shared by long operations.

Long operations (convert, scan, replicate, restore, verify) take two optional keyword
arguments:

* ``progress``: a callable ``progress(done, total)`` in bytes, called from the
  operation's thread now and then (at most every few MiB), ``done`` never decreasing;
* ``cancel``: a :class:`CancelToken`; once cancelled, the operation stops at the next
  safe point, leaves everything it writes valid, and raises :class:`~smsblock.errors.Cancelled`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator

from .errors import Cancelled

ProgressCallback = Callable[[int, int], None]


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


@contextlib.contextmanager
def terminal_progress(description: str, enabled: bool | None = None) -> Iterator[ProgressCallback | None]:
    """A progress callback that draws a bar (bytes, throughput, ETA) on a terminal.

    Yields ``None`` when stderr is not a terminal (or ``enabled`` is False), so scripts
    and logs stay clean.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=0, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
               file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.2)
    lock = threading.Lock()

    def update(done: int, total: int) -> None:
        with lock:
            if bar.total != total:
                bar.total = total
            if done > bar.n:
                bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()
