"""S3Store: a store in an S3 bucket under a prefix (``s3://BUCKET/PREFIX``): the
repository over an :class:`~smsblock.backend.s3.S3Backend`.

Layout (the local store's, as keys)::

    PREFIX/config.json                          store settings, created with If-None-Match: *
    PREFIX/locks/exclusive.json                 prune's lock object (owner + lease)
    PREFIX/locks/shared-<uuid>.json             one per run or reader holding the lock shared
    PREFIX/packs/<id[:2]>/<id>.pack             sealed packs (immutable; id = SHA-256 of index)
    PREFIX/runs/<server_id>/<run_id>.manifest   one per completed run, put last in one PUT
    PREFIX/damaged/<pack_id>.json               damage records (what verify found damaged)

Uploads, ranged reads, the lease lock and leftovers: :mod:`smsblock.backend.s3`.  Pack
indexes and fingerprints are kept on this machine (:meth:`S3Backend.cache_dir`).
"""

from __future__ import annotations

from ..backend.s3 import S3Backend, parse_s3_url  # noqa: F401
from ..backend.s3config import CloudSettings
from ..repository.repository import Repository


class S3Store(Repository):
    """A store at ``s3://BUCKET/PREFIX``; ``settings`` or keyword overrides shape the client
    (see :class:`~smsblock.backend.s3config.CloudSettings`)."""

    def __init__(self, url: str, settings: CloudSettings | None = None, **overrides):
        super().__init__(S3Backend(url, settings, **overrides))

    def __repr__(self) -> str:
        return f"<S3Store {self.url}>"

    # what embedders and tests read of the transport
    settings = property(lambda self: self.backend.settings)
    retry = property(lambda self: self.backend.retry)
    stats = property(lambda self: self.backend.stats)
    client = property(lambda self: self.backend.client)
    bucket = property(lambda self: self.backend.bucket)
    prefix = property(lambda self: self.backend.prefix)
    staging_dir = property(lambda self: self.backend.staging_dir)
    index_cache_dir = property(lambda self: self.backend.index_cache_dir)
