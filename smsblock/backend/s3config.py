"""Settings of the cloud stores (S3, EBS) and the boto3 clients built from them.

Where a setting comes from, lowest precedence first:

1. built-in defaults;
2. the config file: ``$SMSBLOCK_CONFIG`` if set, else ``~/.smsblock/config.toml``
   (table ``[s3]``; the EBS store reads ``[ebs]`` over ``[s3]``);
3. environment variables ``SMSBLOCK_S3_<NAME>`` (e.g. ``SMSBLOCK_S3_BANDWIDTH=2M``);
4. the store URL's query string: ``s3://bucket/prefix?region=eu-west-1&parallel=8``
   (anything but secrets; keys are refused in URLs);
5. keyword arguments of :func:`smsblock.store.open_store` / :class:`CloudSettings`.

What a setting leaves unset, boto3 decides as boto3 users expect: credentials from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``/``~/.aws``, the region
from ``AWS_DEFAULT_REGION``, the endpoint from ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
the CA bundle from ``AWS_CA_BUNDLE``, the proxy from ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``.

botocore's own retries are switched off (one attempt): :mod:`smsblock.backend.retry` is the
only retry policy, so every retry is counted against one budget and logged.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

from ..errors import UsageError

DEFAULT_CONFIG_PATH = "~/.smsblock/config.toml"
ENV_PREFIX = "SMSBLOCK_S3_"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)(i?B)?(/s)?\s*$", re.IGNORECASE)
_SECRET_NAMES = {"access_key_id", "secret_access_key", "session_token"}


def parse_bytes(text, name: str) -> int:
    """``1048576``, ``512K``, ``8MiB``, ``2M/s`` -> bytes (binary units)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UsageError(f"setting {name}: bad size {text!r} (use e.g. 1048576, 512K, 8M)")
    return int(float(m.group(1)) * (1 << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]))


def _parse_bool(text, name: str) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"setting {name}: expected true or false, not {text!r}")


@dataclass
class CloudSettings:
    """Everything that shapes how smsblock talks to S3 and EBS (see the module docstring)."""

    endpoint_url: str | None = None      # e.g. https://s3.example.internal:9000 (S3-compatible)
    region: str | None = None
    profile: str | None = None           # a profile of ~/.aws/config and ~/.aws/credentials
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    proxy: str | None = None             # http://[user:password@]host:port for http and https
    ca_bundle: str | None = None         # PEM file: a corporate proxy's re-signing CA
    verify: bool = True                  # TLS certificate verification (off: insecure)
    parallel: int = 4                    # concurrent part uploads per pack
    bandwidth: int = 0                   # upload cap in bytes/s for the whole store; 0 = none
    part_size: int = 8 << 20             # multipart part size (S3's minimum is 5 MiB)
    multipart_threshold: int = 16 << 20  # packs at least this big go up in parts
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry_attempts: int = 8              # attempts per request, first one included
    retry_seconds: float = 300.0         # give up on a request after this long, whatever the count
    lock_ttl: float = 300.0              # lease of a lock object; renewed every ttl/4
    staging_dir: str | None = None       # where packs are built before upload
    readahead: int = 4 << 20             # sequential pack reads fetch this much at once; 0 = off
    addressing_style: str = "auto"       # auto, path or virtual

    def __post_init__(self):
        for f in fields(self):
            try:
                self._check(f)
            except (ValueError, TypeError) as e:
                raise UsageError(f"setting {f.name}: bad value {getattr(self, f.name)!r} ({e})") from None
        # S3 itself wants parts of at least 5 MiB (but the last); S3-compatible servers and
        # moto (S3_UPLOAD_PART_MIN_SIZE) may take less, so only nonsense is refused here
        if self.part_size < 64 << 10:
            raise UsageError(f"setting part_size {self.part_size} is too small (at least 64K; S3 wants 5M)")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise UsageError("settings access_key_id and secret_access_key go together")

    def _check(self, f) -> None:
        """Convert and check one setting in place (ValueError/TypeError on nonsense)."""
        value = getattr(self, f.name)
        if value is None:
            return
        if f.name in ("parallel", "retry_attempts"):
            value = int(value)
            if value < 1:
                raise UsageError(f"setting {f.name} must be at least 1, not {value}")
        elif f.name in ("bandwidth", "part_size", "multipart_threshold", "readahead"):
            value = parse_bytes(value, f.name)
            if value < 0:
                raise UsageError(f"setting {f.name} must not be negative")
        elif f.name in ("connect_timeout", "read_timeout", "retry_seconds", "lock_ttl"):
            value = float(value)
            if value <= 0:
                raise UsageError(f"setting {f.name} must be positive, not {value}")
        elif f.name == "verify":
            value = _parse_bool(value, f.name)
        elif f.name == "addressing_style" and value not in ("auto", "path", "virtual"):
            raise UsageError(f"setting addressing_style must be auto, path or virtual, not {value!r}")
        setattr(self, f.name, value)

    # -- where settings come from -------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def load(cls, *, url_query: str = "", section: str = "s3", **overrides) -> "CloudSettings":
        """Defaults < config file < ``SMSBLOCK_S3_*`` environment < URL query < ``overrides``."""
        values: dict = {}
        values.update(_from_file(section))
        values.update(_from_env())
        values.update(_from_query(url_query))
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(cls.names())
        if unknown:
            raise UsageError(f"unknown cloud store settings: {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(cls.names())})")
        return cls(**values)

    def redacted(self) -> dict:
        """The settings with secrets (keys, proxy password) masked, for logs and reports."""
        d = dataclasses.asdict(self)
        for k in _SECRET_NAMES:
            if d.get(k):
                d[k] = "***"
        if d.get("proxy"):
            d["proxy"] = _mask_url_password(d["proxy"])
        return d

    # -- boto3 -----------------------------------------------------------------------
    def session(self):
        """A boto3 Session with these credentials/profile/region (boto3's defaults otherwise)."""
        import boto3
        import botocore.exceptions
        try:
            return boto3.session.Session(
                aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
                aws_session_token=self.session_token, region_name=self.region,
                profile_name=self.profile)
        except botocore.exceptions.ProfileNotFound as e:
            raise UsageError(f"setting profile: {e}") from None

    def botocore_config(self, *, max_pool: int | None = None, addressing: bool = True):
        """The botocore Config: timeouts, proxy, pool size, and no botocore retries."""
        from botocore.config import Config
        kw = dict(
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max(10, (max_pool or self.parallel) + 4),
            # checksums only where an API demands them: we send Content-MD5 ourselves, and
            # a streamed aws-chunked body would defeat the bandwidth cap's accounting
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        if addressing:
            kw["s3"] = {"addressing_style": self.addressing_style}
        if self.proxy:
            kw["proxies"] = {"http": self.proxy, "https": self.proxy}
        return Config(**kw)

    def verify_arg(self):
        """botocore's ``verify``: False, a CA bundle path, or None (AWS_CA_BUNDLE/certifi)."""
        if not self.verify:
            return False
        if self.ca_bundle:
            path = os.path.expanduser(self.ca_bundle)
            if not os.path.isfile(path):
                raise UsageError(f"setting ca_bundle: {path}: no such file")
            return path
        return None

    def client(self, service: str, *, max_pool: int | None = None):
        """A boto3 client for ``service`` ("s3", "ebs", "ec2") built from these settings."""
        if not self.verify:
            import urllib3
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        from botocore.exceptions import BotoCoreError
        try:
            return self.session().client(
                service, endpoint_url=self.endpoint_url or None, verify=self.verify_arg(),
                config=self.botocore_config(max_pool=max_pool, addressing=(service == "s3")))
        except (ValueError, BotoCoreError) as e:   # bad endpoint URL, region name, ...
            raise UsageError(f"cannot set up the {service} client: {e} "
                             f"(endpoint {self.endpoint_url or 'default'}, region {self.region or 'default'})") from None


def _mask_url_password(url: str) -> str:
    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@", 1)
    return url


def config_file_path() -> Path:
    """The config file smsblock reads: ``$SMSBLOCK_CONFIG`` or ``~/.smsblock/config.toml``."""
    return Path(os.path.expanduser(os.environ.get("SMSBLOCK_CONFIG") or DEFAULT_CONFIG_PATH))


def _from_file(section: str) -> dict:
    path = config_file_path()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        if os.environ.get("SMSBLOCK_CONFIG"):
            raise UsageError(f"{path}: config file named by SMSBLOCK_CONFIG does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read config file: {e.strerror}") from None
    out: dict = {}
    for name in (["s3"] if section == "s3" else ["s3", section]):
        table = doc.get(name, {})
        if not isinstance(table, dict):
            raise UsageError(f"{path}: [{name}] must be a table")
        out.update({k.replace("-", "_"): v for k, v in table.items() if not isinstance(v, dict)})
    out.pop("store", None)        # [ebs] store = the EBS store's staging store, not a client setting
    return out


def _from_env() -> dict:
    out = {}
    for name in CloudSettings.names():
        value = os.environ.get(ENV_PREFIX + name.upper())
        if value not in (None, ""):
            out[name] = value
    return out


def _from_query(query: str) -> dict:
    out = {}
    for k, v in parse_qsl(query or "", keep_blank_values=False, strict_parsing=False):
        k = k.replace("-", "_")
        if k in _SECRET_NAMES:
            raise UsageError(f"store URL: {k} must not be given in a URL (use the environment, "
                             "a profile or the config file)")
        out[k] = v
    return out
