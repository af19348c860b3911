"""Moved to :mod:`smsblock.backend.retry` (the one retry policy); kept for imports."""

from ..backend.retry import (PERMANENT_CODES, TRANSIENT_CODES, RetryPolicy, classify,  # noqa: F401
                             describe, error_code, http_status, permanent_message)
