"""The Store protocol, now :class:`smsblock.repository.Repository` over a backend
(:mod:`smsblock.backend`); the names embedders import from here keep working."""

from __future__ import annotations

from ..repository.repository import (DEFAULT_PACK_SIZE, RUN_ID_RE, SERVER_ID_RE,  # noqa: F401
                                     STORE_FORMAT, STORE_VERSION, DamageRecord, PackStat,
                                     Repository, RunInfo, StoreConfig, check_run_id,
                                     check_server_id, no_store_error)

#: the store protocol: a repository over any backend
Store = Repository
