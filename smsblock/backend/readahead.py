"""Read-ahead for objects read in pieces over a network (a restore walking a pack).

A restore reads a pack block by block, on several threads at once, each thread walking its
own part of the disk, so the reads of one object arrive a little out of order and from
several places.  Reads that land a little forward of a recent read of the same object are a stream: they
are served from aligned windows of ``ahead`` bytes, each fetched once (a thread that needs a
window another thread is fetching waits for it).  A read near no other read (a block
deduplicated from an old pack) fetches exactly its bytes, so random reads are never
amplified.  Memory is bounded: at most ``MAX_WINDOWS`` windows and ``MAX_OBJECTS`` objects'
recent read positions are kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable

Fetch = Callable[[str, int, int], bytes]


class Readahead:
    MAX_WINDOWS = 8          # 8 x 4 MiB by default: enough for every reader thread's stream
    MAX_OBJECTS = 64         # objects whose recent read ends are remembered
    ENDS_PER_OBJECT = 8      # recent read ends per object (one per reader thread, and some)

    def __init__(self, fetch: Fetch, ahead: int):
        self._fetch = fetch
        self.ahead = ahead
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[str, int], Future] = OrderedDict()
        self._ends: OrderedDict[str, list[int]] = OrderedDict()

    def read(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``name`` at ``offset``; short at the object's end."""
        ahead = self.ahead
        if length <= 0:
            return b""
        if not ahead or length >= ahead:
            return self._fetch(name, offset, length)
        first, last = offset // ahead, (offset + length - 1) // ahead
        with self._lock:
            cached = all((name, k) in self._windows for k in range(first, last + 1))
            streaming = cached or self._near(name, offset)
            self._note(name, offset + length)
            if streaming:
                windows = [self._window(name, k) for k in range(first, last + 1)]
        if not streaming:
            return self._fetch(name, offset, length)
        owned = [(k, future) for k, (future, mine) in zip(range(first, last + 1), windows) if mine]
        try:
            for k, future in owned:
                future.set_result(self._fetch(name, k * ahead, ahead))
        except BaseException as e:
            # Every window this thread took on is settled, or its waiters would wait forever;
            # failed ones are not kept, so the next read asks again.
            with self._lock:
                for k, future in owned:
                    if not future.done():
                        if self._windows.get((name, k)) is future:
                            del self._windows[(name, k)]
                        future.set_exception(e)
            raise
        out = []
        for k, (future, _) in zip(range(first, last + 1), windows):
            data = future.result()
            out.append(data[max(0, offset - k * ahead):offset + length - k * ahead])
            if len(data) < ahead:            # the object ends in this window
                break
        return b"".join(out) if len(out) > 1 else out[0]

    def forget(self, name: str) -> None:
        """Drop what is held of ``name`` (it was replaced or deleted)."""
        with self._lock:
            for key in [key for key in self._windows if key[0] == name]:
                del self._windows[key]
            self._ends.pop(name, None)

    # -- under the lock ------------------------------------------------------------------------
    def _near(self, name: str, offset: int) -> bool:
        # Forward of a recent read's end, by at most half a window: each reader thread
        # walks forward from its own last read (their ends are all kept), and a wrong
        # guess costs at most a window.  Never backward: a pack's index is read just
        # before its footer, and must not pull in a window.
        reach = self.ahead // 2
        return any(end <= offset <= end + reach for end in self._ends.get(name, ()))

    def _note(self, name: str, end: int) -> None:
        ends = self._ends.pop(name, [])
        ends.append(end)
        self._ends[name] = ends[-self.ENDS_PER_OBJECT:]
        while len(self._ends) > self.MAX_OBJECTS:
            self._ends.popitem(last=False)

    def _window(self, name: str, k: int) -> tuple[Future, bool]:
        """The window's future, and whether this caller must fetch it."""
        future = self._windows.get((name, k))
        if future is not None:
            self._windows.move_to_end((name, k))
            return future, False
        future = Future()
        self._windows[(name, k)] = future
        while len(self._windows) > self.MAX_WINDOWS:
            self._windows.popitem(last=False)   # waiters keep their own reference
        return future, True
