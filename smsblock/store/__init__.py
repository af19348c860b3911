"""Block stores: :func:`open_store` picks the backend from a URL and returns the
repository over it (:class:`~smsblock.repository.Repository`, also named ``Store``); the
names embedders import live here.  Layers: docs/architecture.md, "The store's layers".

* a local path or ``file:///path``: :class:`LocalStore` (the embedded default);
* ``s3://BUCKET/PREFIX``: :class:`~smsblock.store.s3.S3Store` (settings: docs/cloud.md);
* ``ebs://[REGION]``: :class:`~smsblock.store.ebs.EbsStore`, one EBS snapshot per run.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from ..errors import UsageError
from .base import PackStat, RunInfo, Store, StoreConfig, check_run_id, check_server_id
from .local import LocalStore

__all__ = ["open_store", "Store", "StoreConfig", "RunInfo", "PackStat", "LocalStore",
           "check_server_id", "check_run_id"]


def open_store(url_or_path) -> Store:
    """Open the store at a local path, ``file://``, ``s3://`` or ``ebs://`` URL.

    Opening does not create anything: :meth:`Store.initialise` (``smsblock init``) or
    :func:`smsblock.engine.replicate` with ``create=True`` creates the store; readers of a
    store that does not exist get a StoreError.
    """
    if isinstance(url_or_path, Store):
        return url_or_path
    text = os.fspath(url_or_path)
    if not text:
        raise UsageError("empty store path")
    scheme = urlparse(text).scheme.lower() if "://" in text else ""
    if scheme in ("", "file"):
        if scheme == "file":
            parsed = urlparse(text)
            if parsed.netloc not in ("", "localhost"):
                raise UsageError(f"{text}: file:// URLs must name a local path (file:///path)")
            text = unquote(parsed.path)
        return LocalStore(text)
    if scheme == "s3":      # cloud stores: boto3 is imported only when one is used
        from .s3 import S3Store
        return S3Store(text)
    if scheme == "ebs":
        from .ebs import EbsStore
        return EbsStore(text)
    raise UsageError(f"{text}: unknown store URL scheme {scheme!r} (use a path, file://, s3:// or ebs://)")
