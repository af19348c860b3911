"""Disks made of fixed-size blocks fetched one at a time (a stored run, an EBS snapshot)."""

from __future__ import annotations

import contextlib
import threading

from .base import Disk


class BlockDisk(Disk):
    """A read-only Disk whose bytes come block by block from :meth:`fetch_block`.

    ``readinto`` walks the blocks a range covers; a small cache keeps the last few
    blocks, because readers that ask for less than a block (the image step, restores in
    small chunks) ask for the same block again and again.  Thread-safe.  ``hold`` (what
    the disk's maker took for it: a lock, an open manifest) is closed by :meth:`close`.
    """

    CACHE_BLOCKS = 4
    block_size: int

    def __init__(self, hold: contextlib.ExitStack | None = None) -> None:
        self._cache: dict[int, bytes] = {}
        self._cache_lock = threading.Lock()
        self._hold = hold

    def close(self) -> None:
        """Release what the disk holds; idempotent."""
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.close()

    def fetch_block(self, i: int) -> bytes | None:
        """Block ``i``'s bytes (the last block cut to the disk's end), or None when it
        reads as zeros.  Called without locks, possibly from several threads."""
        raise NotImplementedError

    def block(self, i: int) -> bytes | None:
        """Block ``i``, from the cache when it is there."""
        with self._cache_lock:
            hit = self._cache.get(i)
        if hit is not None:
            return hit
        data = self.fetch_block(i)
        if data is not None:
            with self._cache_lock:
                if len(self._cache) >= self.CACHE_BLOCKS:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[i] = data
        return data

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        want = max(0, min(len(view), self.size - offset))
        done = 0
        while done < want:
            i, within = divmod(offset + done, self.block_size)
            n = min(want - done, self.block_size - within)
            data = self.block(i)
            view[done:done + n] = bytes(n) if data is None else data[within:within + n]
            done += n
        return done
