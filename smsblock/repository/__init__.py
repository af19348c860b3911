"""The repository: what a store holds on top of its objects (packs, the block index,
manifests, damage records) and the store-side work of the engine: the pack writer of a
run, reading a run back (:class:`RunDisk`), :func:`verify` and :func:`prune`.

:mod:`smsblock.engine` re-exports the public names, so ``from smsblock.engine import
verify`` keeps working.
"""

from __future__ import annotations

from .prune import PruneReport, prune
from .rundisk import RunDisk
from .verify import DeepVerifyReport, VerifyReport, verify, verify_run_against_disk
from .writer import QUEUE_DEPTH

__all__ = ["RunDisk", "verify", "verify_run_against_disk", "prune", "VerifyReport",
           "DeepVerifyReport", "PruneReport", "QUEUE_DEPTH"]
