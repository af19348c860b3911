"""Removing old runs and the blocks no run references: :func:`prune`."""

from __future__ import annotations

import dataclasses
import errno
import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import StoreCorruptError, UsageError
from ..manifest import entry_batches
from ..pack import BlockLocation, PackWriter, address_function
from ..progress import ProgressCallback, with_phase
from .repository import Repository
from .repository import check_server_id
from .fingerprints import PackFingerprints, note_sealed

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What :func:`prune` removed."""

    runs_deleted: list[str] = field(default_factory=list)
    runs_kept: list[str] = field(default_factory=list)
    packs_deleted: int = 0
    packs_rewritten: int = 0
    blocks_deleted: int = 0
    bytes_freed: int = 0
    leftovers_removed: int = 0
    #: packs a rewrite could not replace for want of space (kept whole; prune again later)
    packs_left: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _address_view(a: np.ndarray) -> np.ndarray:
    """Rows of an (n, 32) uint8 array as single comparable items."""
    return np.ascontiguousarray(a).view(np.dtype((np.void, 32))).reshape(-1)


def _live_entries(store: Repository, server_id: str, doomed: list[str],
                  indexes: list[np.ndarray]) -> np.ndarray:
    """One flag per index entry (in pack order): some run but the doomed ones references
    its address.  The manifests are streamed a window of entries at a time and looked up
    in the sorted index addresses, so memory is a flag per entry, not the runs' addresses
    (which grow with every run kept).  Read before prune deletes anything: a manifest that
    does not load stops prune with nothing removed."""
    addrs = _address_view(np.concatenate([ix["address"] for ix in indexes])
                          if indexes else np.zeros((0, 32), np.uint8))
    order = np.argsort(addrs, kind="stable")
    sorted_addrs = addrs[order]
    live_sorted = np.zeros(len(addrs), bool)
    for sid, rid in store.iter_manifests():
        if sid == server_id and rid in doomed:
            continue
        with store.open_manifest(sid, rid) as m:
            for _idx, _states, _hashes, addresses in entry_batches(m):
                wanted = _address_view(addresses)
                pos = np.searchsorted(sorted_addrs, wanted)
                hit = pos < len(sorted_addrs)
                hit[hit] = sorted_addrs[pos[hit]] == wanted[hit]
                live_sorted[pos[hit]] = True        # the first copy of each address
    if len(addrs) > 1:
        # every copy of a live address is live (the best copy is chosen later)
        same = sorted_addrs[1:] == sorted_addrs[:-1]
        group = np.concatenate([[0], np.cumsum(~same)])
        live_group = np.zeros(int(group[-1]) + 1, bool)
        live_group[group[live_sorted]] = True
        live_sorted = live_group[group]
    live = np.zeros(len(addrs), bool)
    live[order] = live_sorted
    return live


def _readable_packs(store: Repository) -> tuple[list[tuple[str, int]], list[np.ndarray]]:
    """``([(pack_id, size)], [index])`` of the packs whose index reads; a damaged one is
    left alone for a human (verify reports it)."""
    packs, indexes = [], []
    for pack_id, size in sorted(store.list_packs().items()):
        try:
            indexes.append(store.pack_index(pack_id, size))
            packs.append((pack_id, size))
        except StoreCorruptError as e:
            log.warning("%s (prune leaves this pack alone)", e)
    return packs, indexes


def _entry_ranks(store: Repository, packs: list[tuple[str, int]], indexes: list[np.ndarray]
                 ) -> tuple[np.ndarray, set[str]]:
    """Per index entry (in pack order) how good a copy of its block it is: 0 sound,
    1 in a pack damaged outside its frames (readable, used only when no sound copy
    exists), 2 a damaged frame (never kept).  Frames a record names are read again first,
    so a wrong or stale record never costs a block.  Also returns the ids of packs with a
    damage record."""
    damage = store.damage()
    ranks = []
    for (pack_id, _), index in zip(packs, indexes):
        rank = np.zeros(len(index), np.int8)
        record = damage.get(pack_id)
        if record is not None:
            if record.pack:
                rank[:] = 1
            for i in np.flatnonzero(record.holds(index["address"])):
                e = index[i]
                loc = BlockLocation(pack_id, int(e["offset"]), int(e["clen"]), int(e["ulen"]))
                try:
                    sound = address_function(store.config.address)(store.read_block(loc)) \
                        == e["address"].tobytes()
                except StoreCorruptError:
                    sound = False
                if not sound:
                    rank[i] = 2
            if not record.pack and not (rank == 2).any():
                store.delete_damage_record(pack_id)      # every named frame reads fine now
        ranks.append(rank)
    return (np.concatenate(ranks) if ranks else np.zeros(0, np.int8)), set(damage)


def _wanted_entries(indexes: list[np.ndarray], live: np.ndarray,
                    ranks: np.ndarray | None = None) -> np.ndarray:
    """``live``: one flag per index entry (:func:`_live_entries`)."""
    """One flag per index entry, in pack order: a run uses the entry's block and it is the
    best copy of its address (the first sound one; copies come from concurrent runs, an
    interrupted prune, or a run that stored a damaged block again)."""
    addrs = _address_view(np.concatenate([ix["address"] for ix in indexes])
                          if indexes else np.zeros((0, 32), np.uint8))
    if ranks is None:
        ranks = np.zeros(len(addrs), np.int8)
    # sort by address, then rank, then position: the first of each address is its best copy
    _, group = np.unique(addrs, return_inverse=True)
    order = np.lexsort((np.arange(len(addrs)), ranks, group.reshape(-1)))
    sorted_addrs = addrs[order]
    first = np.ones(len(order), bool)
    first[1:] = sorted_addrs[1:] != sorted_addrs[:-1]
    wanted = np.zeros(len(addrs), bool)
    wanted[order[first]] = True
    return wanted & (ranks < 2) & live


def _rewrite_pack(store: Repository, pack_id: str, entries: np.ndarray) -> tuple[str, int]:
    """Put a new pack of ``entries`` of ``pack_id`` (frames copied as they are); return
    its id and size."""
    writer = PackWriter(store.staging_path(".pack.tmp"), store.config.address)
    try:
        for e in entries:
            frame = store.read_pack(pack_id, int(e["offset"]), int(e["clen"]))
            writer.add(e["address"].tobytes(), frame, int(e["ulen"]))
        new_id, _ = writer.seal()
    except BaseException:
        writer.discard()
        raise
    store.put_pack(new_id, writer.path)
    note_sealed(store, PackFingerprints(store), new_id)
    return new_id, writer.sealed_size


def prune(store, server_id: str, keep: int, *, progress: ProgressCallback | None = None,
          dry_run: bool = False) -> PruneReport:
    """Keep the newest ``keep`` runs of ``server_id`` and delete the older ones, then delete
    every stored block no remaining run (of any server) references: packs with no live
    block are deleted, packs with some are rewritten with only the live ones (frames copied
    as they are).  Also removes what killed runs left (temp files, unreferenced packs).

    It works on a full disk: leftovers and dead packs go first, and a rewrite that finds
    no space keeps its pack whole (``packs_left`` counts them) instead of failing.

    Takes the store lock exclusively: fails with StoreLockedError while a run or a
    :meth:`Repository.run_disk` reader uses the store.  ``dry_run=True``
    changes nothing and returns what would be deleted (runs, whole packs and the blocks
    in them; blocks a rewrite would drop are counted too, their bytes are not).
    """
    progress = with_phase(progress, "pruning")
    store.require()
    check_server_id(server_id)
    if not isinstance(keep, int) or keep < 0:
        raise UsageError(f"--keep must be a non-negative integer, not {keep!r}")
    report = PruneReport()
    with store.lock(exclusive=True, purpose="prune"):
        ids = store.list_run_ids(server_id)
        doomed = ids[:max(0, len(ids) - keep)]
        report.runs_kept = ids[len(doomed):]
        # the exclusive lock holds packs still: their indexes are read once, first
        packs, indexes = _readable_packs(store)
        live = _live_entries(store, server_id, doomed, indexes)
        if dry_run:
            return _prune_dry_run(store, doomed, live, report, packs, indexes)
        for run_id in doomed:        # oldest first: a crash midway still keeps the newest
            store.delete_manifest(server_id, run_id)
            report.runs_deleted.append(run_id)

        # what frees space without taking any goes first, so prune works on a full disk:
        # what killed runs left, then packs with no live block; rewrites (which write a
        # new pack before the old one goes) last, each skipped when the disk is full
        for name in store.list_leftovers():
            report.bytes_freed += store.remove_leftover(name)
            report.leftovers_removed += 1

        ranks, recorded = _entry_ranks(store, packs, indexes)
        wanted_all = _wanted_entries(indexes, live, ranks)
        done, total, start = 0, sum(size for _, size in packs), 0
        rewrites = []
        for (pack_id, size), index in zip(packs, indexes):
            want = wanted_all[start:start + len(index)]
            start += len(index)
            if not want.any():
                store.delete_pack(pack_id)
                report.packs_deleted += 1
                report.blocks_deleted += len(index)
                report.bytes_freed += size
                done += size
                if progress is not None:
                    progress(done, total)
            elif not want.all():
                rewrites.append((pack_id, size, index, want))
            else:
                done += size
        written = set()
        for pack_id, size, index, want in rewrites:
            # a pack a rewrite earlier in this loop wrote may have been there already (a
            # killed prune's rewrite, its old pack not yet deleted): it now holds the
            # only copies of its blocks, though they counted as the second ones
            if pack_id not in written:
                try:
                    new_id, new_size = _rewrite_pack(store, pack_id, index[want])
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    log.warning("%s: no space to rewrite it without its %d dead blocks; kept "
                                "whole (prune again once there is room)", store.pack_name(pack_id),
                                int((~want).sum()))
                    report.packs_left += 1
                else:
                    written.add(new_id)
                    if new_id != pack_id:   # the new pack is in place: the old one can go
                        store.delete_pack(pack_id)
                        if pack_id in recorded:
                            # the copy holds only sound frames (rank 0 or 1), with a new header
                            store.delete_damage_record(pack_id)
                    report.packs_rewritten += 1
                    report.blocks_deleted += int((~want).sum())
                    report.bytes_freed += max(0, size - new_size)
            done += size
            if progress is not None:
                progress(done, total)

        # records of packs that are gone (deleted above, or by an earlier, killed prune)
        remaining = store.list_packs()
        for pack_id in store.list_damage_records():
            if pack_id not in remaining:
                store.delete_damage_record(pack_id)
        if progress is not None and total:
            progress(total, total)      # packs that stayed whole were passed over silently
    return report


def _prune_dry_run(store: Repository, doomed: list[str], live: np.ndarray, report: PruneReport,
                   packs, indexes) -> PruneReport:
    """What :func:`prune` would delete, computed without changing anything."""
    report.runs_deleted = list(doomed)
    wanted_all = _wanted_entries(indexes, live)
    start = 0
    for (_pack_id, size), index in zip(packs, indexes):
        want = wanted_all[start:start + len(index)]
        start += len(index)
        if not want.any():
            report.packs_deleted += 1
            report.bytes_freed += size
        elif not want.all():
            report.packs_rewritten += 1
        report.blocks_deleted += int((~want).sum())
    report.leftovers_removed = len(store.list_leftovers())
    return report

