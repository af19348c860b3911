"""Moved to :mod:`smsblock.backend.s3config`; kept for imports."""

from ..backend.s3config import (DEFAULT_CONFIG_PATH, ENV_PREFIX, CloudSettings,  # noqa: F401
                                config_file_path, parse_bytes)
