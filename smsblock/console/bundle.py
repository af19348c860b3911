"""The connector's downloadable log bundle: recent logs and settings, every secret removed.

:class:`LogBuffer` keeps the last log records of the serving process in memory (bounded);
:func:`log_bundle` writes a zip of those logs, the connectors' settings, the service
limits and versions.  :func:`redact` removes the secrets that could appear in any of it:
the API secret access key, the vCenter password (from its file or the environment),
SigV4 signatures, session cookies, and any value of a key that names a secret.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import re
import threading
import time
import zipfile

from ..fsutil import first_line, read_small_file
from .. import __version__

MAX_RECORDS = 5000
MAX_LOG_FILE = 4 << 20
REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(?i).*(password|secret|token|credential|session|cookie|private).*")
_PATTERNS = [
    re.compile(r"(?i)(Signature=)[0-9a-f]{16,}"),
    re.compile(r"(?i)(Credential=)[^/\s,]+"),
    re.compile(r"(?i)(smsblock_console=|smsblock_login=)[A-Za-z0-9_\-]+"),
    re.compile(r"(?i)((?:password|secret|token)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"),
]


class LogBuffer(logging.Handler):
    """The last :data:`MAX_RECORDS` formatted log records of this process (warnings and
    errors; INFO too when ``smsblock -v serve``)."""

    _installed: "LogBuffer | None" = None
    _install_lock = threading.Lock()

    def __init__(self, capacity: int = MAX_RECORDS):
        super().__init__(logging.DEBUG)
        self.records: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append(self.format(record))
        except Exception:    # never let logging break a request
            self.handleError(record)

    @classmethod
    def install(cls) -> "LogBuffer":
        """One buffer per process on the ``smsblock`` logger."""
        with cls._install_lock:
            if cls._installed is None:
                cls._installed = cls()
                # the levels stay as the CLI set them (-v): raising them here would
                # also print every INFO record on serve's stderr
                logging.getLogger("smsblock").addHandler(cls._installed)
            return cls._installed

    def lines(self) -> list[str]:
        return list(self.records)


def known_secrets(server) -> list[str]:
    """The secret values this process knows of: the API secret, vCenter passwords."""
    out = [server.credentials.secret_access_key]
    env = os.environ.get("SMSBLOCK_VCENTER_PASSWORD")
    if env:
        out.append(env)
    for row in server.service.state.query("SELECT source_config FROM connectors"):
        try:
            path = json.loads(row["source_config"]).get("passwordFile")
        except (ValueError, AttributeError):
            continue
        if path:
            try:      # without blocking, bounded: a FIFO or a device must not hang the console
                line = first_line(read_small_file(path, 64 * 1024), 4096).decode("utf-8").rstrip("\r\n")
                if line:
                    out.append(line)
            except (OSError, UnicodeDecodeError):
                pass
    return [s for s in out if s]


def redact(text: str, secrets: list[str]) -> str:
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    for p in _PATTERNS:
        text = p.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact_settings(value):
    """A settings document with the value of every secret-looking key removed."""
    if isinstance(value, dict):
        return {k: (REDACTED if _SECRET_KEY.fullmatch(str(k)) and v is not None
                    else redact_settings(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_settings(v) for v in value]
    return value


def log_bundle(server, logs: LogBuffer) -> bytes:
    """The zip the connector page offers for download."""
    svc = server.service
    secrets = known_secrets(server)
    connectors = []
    for row in svc.state.query("SELECT * FROM connectors ORDER BY associated_on"):
        try:
            config = json.loads(row["source_config"])
        except ValueError:
            config = {}
        connectors.append(redact_settings({
            "connectorId": row["connector_id"], "version": row["version"],
            "sourceKind": row["source_kind"], "sourceConfig": config, "store": row["store"],
            "associatedOn": row["associated_on"], "disassociatedOn": row["disassociated_on"],
            "lastHeartbeat": row["last_heartbeat"]}))
    settings = {
        "smsblockVersion": __version__,
        "generatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stateDirectory": str(svc.state.dir),
        "limits": vars(svc.config),
        "connectors": connectors,
        "proxy": {k: os.environ.get(k) for k in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")
                  if os.environ.get(k)},
        "apiAccessKeyId": server.credentials.access_key_id,
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("settings.json", redact(json.dumps(redact_settings(settings), indent=2,
                                                      default=str), secrets) + "\n")
        z.writestr("logs/serve.log", redact("\n".join(logs.lines()), secrets) + "\n")
        for name in sorted(os.listdir(svc.state.dir)):
            # log files the operator's service manager writes into the state directory
            if name.endswith(".log") and os.path.isfile(svc.state.dir / name) \
                    and not os.path.islink(svc.state.dir / name):
                with open(svc.state.dir / name, "rb") as f:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - MAX_LOG_FILE))   # the tail only
                    tail = f.read(MAX_LOG_FILE).decode("utf-8", "replace")
                z.writestr(f"logs/{name}", redact(tail, secrets))
    return buf.getvalue()
