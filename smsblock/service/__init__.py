"""The SMS control plane: connectors, server catalog, replication jobs and runs.

:class:`SmsService` (``api.py``) is the Python API; ``smsblock sms`` and ``smsblock serve``
are built on it.  See docs/service.md.
"""

from .api import SmsService
from .scheduler import FakeClock
from .sources import DatastoreSource, open_source, register_source_kind
from .state import ServiceConfig, State

__all__ = ["SmsService", "FakeClock", "DatastoreSource", "open_source",
           "register_source_kind", "ServiceConfig", "State"]
