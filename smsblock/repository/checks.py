"""One pack read whole and checked, and its damage record made to say what was found:
shared by :func:`~smsblock.repository.verify.verify` and the run-start check of changed
packs (:mod:`~smsblock.repository.fingerprints`)."""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import StoreError
from ..pack import verify_pack
from .repository import Repository


def check_pack(store: Repository, pack_id: str, size: int):
    """Read a whole pack and check every part of it: ``(index or None, good, problems)``
    as :func:`~smsblock.pack.verify_pack` gives them."""
    return verify_pack(lambda o, n: store.read_pack(pack_id, o, n), size,
                       store.pack_name(pack_id), store.config.address)


def record_check(store: Repository, pack_id: str, index: np.ndarray | None, good, problems: list[str],
                 old) -> bool:
    """Make the pack's damage record say what a read of every byte just found (``old``:
    its record before).  True when the store now says so (no damage, or the damage is
    recorded); False when the index does not read (no record can name its blocks; a run
    leaves the pack out of its block index: see ``check_changed_packs``) or the record
    could not be written."""
    if index is None:
        return False
    _update_damage_record(store, pack_id, index, good, problems, old)
    return not problems or pack_id in store.list_damage_records()


def _update_damage_record(store: Repository, pack_id: str, index: np.ndarray, good: np.ndarray,
                          problems: list[str], old) -> None:
    """Make the pack's damage record say what verify just found (a read of every byte)."""
    bad = index["address"][~good]
    whole = len(problems) > len(bad)          # damage outside the frames
    if not problems:
        if old is not None:
            with contextlib.suppress(StoreError):
                store.delete_damage_record(pack_id)
        return
    found = {a.tobytes() for a in bad}
    if old is not None and (old.addresses, old.pack) == (found, whole):
        return
    store.record_damage(pack_id, found, pack=whole, problems=problems, by="verify", replace=True)
