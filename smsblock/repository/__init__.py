"""The repository: what a store holds on top of a backend's objects (packs, the block
index, manifests, damage records, pack fingerprints) and the store-side work of the
engine: the pack writer of a run (``writer``), reading a run back (``rundisk``),
``verify`` and ``prune``.

Layers: :mod:`smsblock.engine` -> :mod:`smsblock.repository` -> :mod:`smsblock.backend`;
:mod:`smsblock.publish` (EBS) runs when a run's manifest is complete, before the
manifest is committed with the snapshot's record.  :mod:`smsblock.store`
keeps the names embedders import (``open_store``, ``Store``, ``LocalStore``...), and
:mod:`smsblock.engine` the functions (``verify``, ``prune``) on a Store or a path/URL.
"""

from __future__ import annotations

from .repository import Repository
from .rundisk import RunDisk

__all__ = ["Repository", "RunDisk"]
