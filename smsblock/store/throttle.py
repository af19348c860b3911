"""Moved to :mod:`smsblock.backend.throttle` (the one bandwidth cap); kept for imports."""

from ..backend.throttle import CHUNK, ThrottledBody, TokenBucket  # noqa: F401
