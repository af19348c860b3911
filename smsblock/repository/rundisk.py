"""Reading a run back: :class:`RunDisk`, a read-only Disk over one run's blocks in the packs."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import xxhash

from ..disk import DiskInfo, Extent, ExtentKind
from ..disk.blocks import BlockDisk
from ..errors import StoreCorruptError
from ..manifest import BlockState, Manifest, ManifestReader
from ..pack import BlockIndex, address_function

if TYPE_CHECKING:       # the repository makes RunDisks; RunDisk only reads through it
    from .repository import Repository

_KIND = {BlockState.DATA: ExtentKind.DATA, BlockState.ZERO: ExtentKind.ZERO}


class RunDisk(BlockDisk):
    """A read-only :class:`~smsblock.disk.Disk` over one run, reading blocks from the packs.

    DATA blocks are extents of kind DATA, ZERO blocks extents of kind ZERO, unallocated
    blocks are gaps.  ``manifest`` is a :class:`~smsblock.manifest.ManifestReader` (read
    a frame at a time: memory does not follow the disk's size) or a whole Manifest.
    Thread-safe; keeps a few inflated blocks cached.  ``hold`` (what
    :meth:`Repository.run_disk` passes: the store lock it took) is closed by :meth:`close`.
    """

    def __init__(self, store: Repository, manifest: Manifest | ManifestReader, index: BlockIndex | None = None,
                 hold: contextlib.ExitStack | None = None):
        super().__init__(hold)
        self.store = store
        self.manifest = manifest
        meta = manifest.meta
        self.path = f"{store.url}#{meta.get('server_id', '?')}/{meta.get('run_id', '?')}"
        self.size = manifest.disk_size
        self.info = DiskInfo(path=self.path, format="run", virtual_size=self.size)
        self.block_size = manifest.block_size
        self._index = index if index is not None else store.block_index()

    def fetch_block(self, i: int) -> bytes | None:
        # one block's entry: a ManifestReader decodes (and caches) only its frame
        state, block_hash, address = self.manifest.entry(i)
        if state != BlockState.DATA:
            return None
        loc = self._index.get(address)
        if loc is None:
            raise StoreCorruptError(f"block {i} ({address.hex()[:16]}...) is not in the store",
                                    self.path, i * self.block_size)
        try:
            data = self.store.read_block(loc)
        except StoreCorruptError:
            self._record_damage(loc.pack_id, address)
            raise
        expected = self.manifest.block_range(i)[1]
        if len(data) != expected:
            raise StoreCorruptError(f"stored block {i} has {len(data)} bytes, expected {expected}",
                                    self.path, i * self.block_size)
        # the run's own change hash (xxh3-128, ~10 GB/s) catches a block damaged in the
        # store, so a restore never writes wrong bytes silently
        if xxhash.xxh3_128_digest(data) != block_hash:
            if address_function(self.store.config.address)(data) != address:
                self._record_damage(loc.pack_id, address)
            raise StoreCorruptError(f"stored block {i} ({address.hex()[:16]}...) does not match "
                                    "the run's hash: the store is damaged (run verify)",
                                    self.path, i * self.block_size)
        return data

    def _record_damage(self, pack_id: str, address: bytes) -> None:
        # the next run then stores this block again instead of building on the bad copy
        self.store.record_damage(pack_id, [address], problems=[
            f"{self.store.pack_name(pack_id)}: block {address.hex()[:16]}... does not read back"],
            by="read")

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[Extent]:
        start, end = self._clip(start, end)
        if start >= end:
            return
        bs = self.manifest.block_size
        first, last = start // bs, (end - 1) // bs + 1
        # the manifest's runs, neighbours of one kind merged; unallocated runs are gaps
        cur_state = cur_lo = cur_hi = None
        for state, a, count, _h, _a in self.manifest.runs(first, last):
            if state == BlockState.UNALLOCATED:
                continue
            lo, hi = max(start, a * bs), min(end, (a + count) * bs)
            if state == cur_state and lo == cur_hi:
                cur_hi = hi
                continue
            if cur_state is not None:
                yield Extent(cur_lo, cur_hi - cur_lo, _KIND[cur_state])
            cur_state, cur_lo, cur_hi = state, lo, hi
        if cur_state is not None:
            yield Extent(cur_lo, cur_hi - cur_lo, _KIND[cur_state])
