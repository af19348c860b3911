"""LocalStore: a store in a local directory (the embedded default): the repository over
a :class:`~smsblock.backend.local.LocalBackend`.

Layout::

    STORE/config.json                      store settings (address algorithm, pack size...)
    STORE/lock                             flock: shared by runs and readers, exclusive by prune
    STORE/packs/<id[:2]>/<id>.pack         sealed packs (immutable)
    STORE/runs/<server_id>/<run_id>.manifest   one per completed run
    STORE/damaged/<pack_id>.json           damage records (what verify found damaged)
    STORE/tmp/                             packs and manifests being written
    STORE/cache/                           what clients know of the packs (pack fingerprints)

See :mod:`smsblock.backend.local` for how files are written (atomic renames, owner-only,
never through a link).
"""

from __future__ import annotations

from ..backend.local import LocalBackend
from ..repository.repository import MANIFEST_SUFFIX, Repository  # noqa: F401


class LocalStore(Repository):
    """A store in the directory ``root`` (created by :meth:`initialise`)."""

    def __init__(self, root):
        super().__init__(LocalBackend(root))
        self.root = self.backend.root

    def __repr__(self) -> str:
        return f"<LocalStore {self.root!r}>"
