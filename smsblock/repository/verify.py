"""Checking a store: :func:`verify` (every pack read, every manifest checked against the
packs) and :func:`verify_run_against_disk` (a run compared with the disk as it is now)."""

from __future__ import annotations

import collections
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..disk import Disk, open_disk
from ..errors import ManifestError, RunNotFoundError, StoreError
from ..manifest import BlockState, entry_batches
from ..pack import BlockIndex
from ..progress import CancelToken, ProgressCallback, check_cancel, with_phase
from ..scanner import Gap, scan_stream
from .repository import check_run_id, check_server_id
from .checks import check_pack, record_check
from .fingerprints import PackFingerprints


class _CheckReport:
    """What a check found: ``ok`` when ``problems`` is empty; ``to_dict`` says it too."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class VerifyReport(_CheckReport):
    """What :func:`verify` checked and found; ``ok`` when ``problems`` is empty."""

    packs_checked: int = 0
    blocks_checked: int = 0
    bytes_checked: int = 0
    runs_checked: int = 0
    problems: list[str] = field(default_factory=list)
    unreferenced_packs: int = 0       # packs no run uses (left by a killed run; prune removes)
    damaged_packs: int = 0            # packs with damage recorded (new runs store those blocks again)
    leftovers: list[str] = field(default_factory=list)


@dataclass
class DeepVerifyReport(_CheckReport):
    """What :func:`verify_run_against_disk` found: the blocks whose content in the run
    differs from the disk's now (``differing_blocks``: the first
    :data:`MAX_LISTED_BLOCKS` indexes; ``blocks_differing`` counts them all)."""

    server_id: str
    run_id: str
    disk_size: int
    block_size: int
    blocks_checked: int = 0
    blocks_differing: int = 0
    differing_blocks: list[int] = field(default_factory=list)
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)


MAX_LISTED_BLOCKS = 1000     # differing block indexes a deep verify report lists


def _bounded_map(pool: ThreadPoolExecutor, fn, items, window: int):
    """``pool.map`` in order with at most ``window`` items in flight (bounded memory)."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def verify(store, *, progress: ProgressCallback | None = None,
           cancel: CancelToken | None = None, threads: int = 2) -> VerifyReport:
    """Read every pack and check every block against its content address; load every
    manifest (its own checksums) and check every block it references is in the store.

    Problems are collected in the report, not raised; ``report.ok`` tells.
    ``progress`` counts pack bytes read.
    """
    progress = with_phase(progress, "verifying")
    store.require()
    report = VerifyReport()
    with store.lock(exclusive=False, purpose="verify"):
        algorithm = store.config.address
        stats = store.list_pack_stats()      # fingerprints as they were before the reads
        packs = {pid: st.size for pid, st in stats.items()}
        total = sum(packs.values())
        done = 0
        good_packs: dict[str, np.ndarray] = {}
        damage = store.damage()
        records = PackFingerprints(store)

        def check(item):
            pack_id, size = item
            check_cancel(cancel)
            return pack_id, size, check_pack(store, pack_id, size)

        # two packs at a time: inflating and hashing release the GIL
        with ThreadPoolExecutor(threads, thread_name_prefix="smsblock-verify") as pool:
            results = _bounded_map(pool, check, sorted(packs.items()), threads * 2)
            for pack_id, size, (index, good, problems) in results:
                report.packs_checked += 1
                report.problems.extend(problems)
                if index is not None:
                    report.blocks_checked += len(index)
                    good_packs[pack_id] = index[good]
                if record_check(store, pack_id, index, good, problems, damage.get(pack_id)):
                    # read whole and what it holds recorded: runs need not read it again
                    records.note(pack_id, stats[pack_id].fingerprint)
                report.bytes_checked += size
                done += size
                if progress is not None:
                    progress(done, total)
        good_index = BlockIndex(good_packs)
        referenced: set[str] = set()
        for server_id, run_id in store.iter_manifests():
            check_cancel(cancel)
            report.runs_checked += 1
            where = f"{store.url}: run {server_id}/{run_id}"
            try:
                m = store.open_manifest(server_id, run_id)
            except (ManifestError, RunNotFoundError) as e:
                report.problems.append(f"{where}: {e}")
                continue
            with m:
                report.problems.extend(_check_manifest(m, server_id, run_id, algorithm,
                                                       good_index, where, referenced))
        report.unreferenced_packs = sum(1 for p in good_packs if p not in referenced)
        report.damaged_packs = sum(1 for p in store.list_damage_records() if p in packs)
        report.leftovers = store.list_leftovers()
    return report


def verify_run_against_disk(store, server_id: str, disk, run_id: str | None = None, *,
                            progress: ProgressCallback | None = None,
                            cancel: CancelToken | None = None,
                            threads: int = 2) -> DeepVerifyReport:
    """Re-read the whole ``disk`` (a Disk or a path) and compare it with a run's manifest
    (``run_id``; None: the server's latest run), block by block: proves that a run made
    from a change list equals a full scan of the disk as it is now.

    A block differs when its content does: a DATA block whose xxh3-128 differs, or that
    is DATA on one side and zeros (ZERO or UNALLOCATED, both restored as zeros) on the
    other.  Differences are collected in the report (``report.ok``), not raised; a disk
    of another size than the run's is one problem.  ``progress`` counts bytes read.
    """
    progress = with_phase(progress, "verifying")
    check_server_id(server_id)
    if run_id is not None:
        check_run_id(run_id)
    store.require()
    own_disk = not isinstance(disk, Disk)
    if own_disk:
        disk = open_disk(disk)
    try:
        with store.lock(exclusive=False, purpose="verify"):
            if run_id is None:
                run_id = store.latest_run_id(server_id)
                if run_id is None:
                    raise RunNotFoundError(f"{store.url}: no runs of server {server_id!r}")
            m = store.open_manifest(server_id, run_id)
        with m:
            return _deep_compare(m, disk, server_id, run_id, threads, progress, cancel)
    finally:
        if own_disk:
            disk.close()


def _deep_compare(m, disk, server_id, run_id, threads, progress, cancel) -> DeepVerifyReport:
    """Scan ``disk`` a window at a time against the run's manifest ``m``."""
    report = DeepVerifyReport(server_id=server_id, run_id=run_id, disk_size=m.disk_size,
                              block_size=m.block_size)
    if disk.size != m.disk_size:
        report.problems.append(f"{disk.path}: the disk is {disk.size} bytes, run "
                               f"{server_id}/{run_id} {m.disk_size} bytes")
        return report
    listed: list[int] = []
    count = 0
    stream = scan_stream(disk, block_size=m.block_size, threads=threads, progress=progress,
                         cancel=cancel)
    for seg in stream:
        if isinstance(seg, Gap):            # zeros now: differs where the run has data
            for state, start, n, _h, _a in m.runs(seg.start, seg.end):
                if state == BlockState.DATA:
                    count += n
                    listed.extend(range(start, start + min(n, MAX_LISTED_BLOCKS - len(listed))))
            continue
        states, hashes, _ = m.window(seg.start, seg.end)
        data_run, data_now = states == BlockState.DATA, seg.states == BlockState.DATA
        differ = (data_run != data_now) | (
            data_run & data_now & (hashes != seg.hashes).any(axis=1))
        idx = np.flatnonzero(differ)
        count += len(idx)
        listed.extend((idx[:max(0, MAX_LISTED_BLOCKS - len(listed))] + seg.start).tolist())
    report.blocks_checked = m.n_blocks
    report.bytes_read = stream.stats["bytes_read"]
    report.blocks_differing = count
    report.differing_blocks = listed
    if count:
        shown = ", ".join(map(str, listed[:10]))
        more = f" and {count - 10} more" if count > 10 else ""
        report.problems.append(
            f"run {server_id}/{run_id}: {count} of {m.n_blocks} blocks differ from "
            f"{disk.path} (blocks {shown}{more}; {m.block_size}-byte blocks)")
    return report


def _check_manifest(m, server_id, run_id, algorithm, index: BlockIndex, where,
                    referenced: set[str]) -> list[str]:
    """The problems of one run's manifest (a ManifestReader or Manifest), checked a window
    of entries at a time: memory does not follow the disk's size."""
    problems = []
    if m.meta.get("server_id") != server_id or m.meta.get("run_id") != run_id:
        problems.append(f"{where}: manifest says it is run {m.meta.get('server_id')}/"
                        f"{m.meta.get('run_id')}")
    if m.count(BlockState.DATA) and m.address_algorithm != algorithm:
        problems.append(f"{where}: addresses are {m.address_algorithm}, the store uses {algorithm}")
        return problems
    found = {"no_addr": [0, None], "stray": [0, None], "missing": [0, None]}

    def note(kind: str, blocks) -> None:
        if len(blocks):
            found[kind][0] += len(blocks)
            if found[kind][1] is None:
                found[kind][1] = int(blocks[0])

    size_problem = None
    for idx, states, _hashes, addresses in entry_batches(m, data_only=False):
        data = states == BlockState.DATA
        zero_addr = (addresses == 0).all(axis=1)
        note("no_addr", idx[data & zero_addr])
        note("stray", idx[~data & ~zero_addr])
        rows = np.flatnonzero(data & ~zero_addr)
        present = index.contains_all(addresses[rows])
        note("missing", idx[rows[~present]])
        for r in rows[present].tolist():
            loc = index.get(addresses[r].tobytes())
            referenced.add(loc.pack_id)
            expected = m.block_range(int(idx[r]))[1]
            if loc.ulen != expected and size_problem is None:
                size_problem = (f"{where}: block {int(idx[r])} is stored with {loc.ulen} bytes, "
                                f"expected {expected}")
    count, first = found["no_addr"]
    if count:
        problems.append(f"{where}: {count} data blocks have no address (first: block {first})")
    count, first = found["stray"]
    if count:
        problems.append(f"{where}: {count} non-data blocks carry an address "
                        f"(first: block {first})")
    count, first = found["missing"]
    if count:
        problems.append(f"{where}: {count} referenced blocks are missing or "
                        f"damaged in the store (first: block {first})")
    if size_problem is not None:
        problems.append(size_problem)
    return problems
