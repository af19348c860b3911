"""Pack fingerprints: damage found before anything builds on it, without reading the store.

A pack is immutable once sealed, so any change to its object is damage (or a sound copy
put over a damaged one).  A listing already gives each pack's fingerprint (a local file's
inode, size, mtime and ctime; an S3 object's ETag, size and LastModified: see
:class:`~smsblock.store.base.PackStat`), which any write, truncate, replace or removal
changes.  This client records the fingerprint of every pack it sealed or read whole and
found sound (or whose damage it recorded); at the start of each run
(:func:`check_changed_packs`) every listed pack whose fingerprint differs from its record,
or has none (written by another writer, or before records existed), is read whole and
verified before the run dedups against it.  Damage found goes to the damage records, so
the run stores those blocks again; a pack whose own index no longer reads (its footer or
index damaged) gets no record, and the run leaves it out of its block index (the index
may hold its entries already: the run that sealed it added them from memory).  A run on
an unchanged store reads no pack data.

What this does not see: bytes that change with no metadata change (media rot, a write
below the file system); ``verify`` reads every byte and finds those.

The records are one journal per store in the store's cache folder
(:meth:`~smsblock.store.base.Repository.cache_dir`): ``pack-fingerprints``, a line
``<pack id> <fingerprint>`` per record, appended in one ``O_APPEND`` write (several
processes may append), the last line of a pack winning; rewritten compactly (atomic
replace) when it holds many lines of packs that are gone.  Losing a line or the file
costs one more read of the packs concerned, never a missed change.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from ..errors import StoreError
from ..fsutil import append_file, read_file_at, replace_file
from ..pack import is_pack_id
from ..progress import CancelToken, check_cancel
from .repository import Repository
from .checks import check_pack, record_check

log = logging.getLogger(__name__)

RECORDS = "pack-fingerprints"


class PackFingerprints:
    """The fingerprint records of one store (thread-safe)."""

    def __init__(self, store: Repository):
        self.store = store
        self._lock = threading.Lock()

    def load(self) -> tuple[dict[str, str], int]:
        """``({pack_id: fingerprint}, lines read)``; an unreadable file is no records."""
        try:
            with self.store.cache_dir() as fd:
                raw = read_file_at(RECORDS, dir_fd=fd)
        except (OSError, StoreError) as e:
            log.warning("%s: pack fingerprints unreadable (%s): every pack is checked", self.store.url, e)
            return {}, 0
        out: dict[str, str] = {}
        lines = (raw or b"").split(b"\n")
        for line in lines:
            parts = line.split(b" ")
            # a torn or foreign line names no pack: that pack is simply checked again
            if len(parts) == 2 and parts[1]:
                pid, fp = parts[0].decode("ascii", "replace"), parts[1].decode("ascii", "replace")
                if is_pack_id(pid):
                    out[pid] = fp
        return out, len(lines) - 1

    def note(self, pack_id: str, fingerprint: str | None) -> None:
        """Record that the pack with this fingerprint is known sound (or its damage is
        recorded).  Best effort: a record that cannot be written costs a check later."""
        if not fingerprint or " " in fingerprint or "\n" in fingerprint:
            return
        try:
            with self._lock, self.store.cache_dir() as fd:
                append_file(RECORDS, f"{pack_id} {fingerprint}\n".encode("ascii"), dir_fd=fd)
        except (OSError, StoreError, UnicodeEncodeError) as e:
            log.warning("%s: cannot record the fingerprint of pack %s: %s", self.store.url, pack_id, e)

    def rewrite(self, records: dict[str, str]) -> None:
        """Replace the journal by exactly ``records`` (atomic; lines appended meanwhile by
        another process may be lost: their packs are checked once more)."""
        data = "".join(f"{pid} {fp}\n" for pid, fp in sorted(records.items())).encode("ascii")
        try:
            with self._lock, self.store.cache_dir() as fd:
                replace_file(RECORDS, data, dir_fd=fd, sync=False)
        except (OSError, StoreError) as e:
            log.warning("%s: cannot rewrite the pack fingerprints: %s", self.store.url, e)


def note_sealed(store: Repository, records: PackFingerprints, pack_id: str) -> None:
    """Record a pack this client just put (its fingerprint as the backend shows it now)."""
    try:
        records.note(pack_id, store.pack_fingerprint(pack_id))
    except StoreError as e:
        log.warning("%s: cannot fingerprint pack %s: %s", store.url, pack_id, e)


class CheckedPacks(NamedTuple):
    """What :func:`check_changed_packs` did: the ids of the packs it read whole, and of
    those whose own index does not read (no run may dedup against them)."""

    read: list[str]
    unreadable: set[str]


def check_changed_packs(store: Repository, *, threads: int = 2,
                        cancel: CancelToken | None = None, stats=None) -> CheckedPacks:
    """Verify (read whole) every listed pack whose fingerprint is new or differs from its
    record, recording what is damaged (so no run builds on it) and the fingerprint of
    each pack checked.  Run it before the block index of a run is built, and leave the
    packs it finds ``unreadable`` out of that index; the caller holds the store lock.
    ``stats``: the store's :meth:`~Repository.list_pack_stats`, when the caller has it
    already."""
    if stats is None:
        stats = store.list_pack_stats()
    records = PackFingerprints(store)
    known, lines = records.load()
    todo = [(pid, st) for pid, st in sorted(stats.items())
            if st.fingerprint is None or known.get(pid) != st.fingerprint]
    unreadable: set[str] = set()
    if todo:
        damage = store.damage()
        log.info("%s: %d pack(s) new or changed since this client last saw them: verifying "
                 "them before the run builds on them", store.url, len(todo))
        with ThreadPoolExecutor(threads, thread_name_prefix="smsblock-check") as pool:
            def one(item):
                pid, st = item
                check_cancel(cancel)
                store.forget_pack(pid)      # a cached index may describe the old bytes
                return pid, st, check_pack(store, pid, st.size)
            for pid, st, (index, good, problems) in pool.map(one, todo):
                if index is None:       # its blocks cannot be found: the run stores them
                    unreadable.add(pid)
                    log.warning("%s: pack changed and damaged (left out of the block index; "
                                "run verify): %s", store.url, problems[0] if problems else pid)
                elif problems:
                    log.warning("%s: pack changed and damaged: %s", store.url, problems[0])
                if record_check(store, pid, index, good, problems, damage.get(pid)):
                    records.note(pid, st.fingerprint)
                    known[pid] = st.fingerprint
    live = {pid: fp for pid, fp in known.items() if pid in stats}
    if lines > 2 * len(live) + 64:       # mostly lines of gone or superseded packs
        records.rewrite(live)
    return CheckedPacks([pid for pid, _ in todo], unreadable)
