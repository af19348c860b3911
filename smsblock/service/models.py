"""The SMS API's nouns: enums, records and ids, with the field names of API 2016-10-24.

Records are plain dataclasses whose attribute names are the wire names
(``replicationJobId``, ``seedReplicationTime``...), so ``to_api()`` is a straight
mapping; timestamps are held as aware UTC :class:`datetime` objects and sent as epoch
seconds, which is how the SMS JSON protocol puts them on the wire.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone

from ..errors import ServiceError


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:  # the wire value, not "Class.NAME"
        return self.value


class ConnectorStatus(_StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


class ConnectorCapability(_StrEnum):
    VSPHERE = "VSPHERE"
    SCVMM = "SCVMM"
    HYPERV_MANAGER = "HYPERV-MANAGER"
    SNAPSHOT_BATCHING = "SNAPSHOT_BATCHING"
    SMS_OPTIMIZED = "SMS_OPTIMIZED"


class VmManagerType(_StrEnum):
    VSPHERE = "VSPHERE"
    SCVMM = "SCVMM"
    HYPERV_MANAGER = "HYPERV-MANAGER"


class ServerCatalogStatus(_StrEnum):
    NOT_IMPORTED = "NOT_IMPORTED"
    IMPORTING = "IMPORTING"
    AVAILABLE = "AVAILABLE"
    DELETED = "DELETED"
    EXPIRED = "EXPIRED"


class ServerType(_StrEnum):
    VIRTUAL_MACHINE = "VIRTUAL_MACHINE"


class LicenseType(_StrEnum):
    AWS = "AWS"
    BYOL = "BYOL"


class ReplicationJobState(_StrEnum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    DELETING = "DELETING"
    DELETED = "DELETED"
    COMPLETED = "COMPLETED"
    PAUSED_ON_FAILURE = "PAUSED_ON_FAILURE"
    FAILING = "FAILING"


class ReplicationRunState(_StrEnum):
    PENDING = "PENDING"
    MISSED = "MISSED"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    COMPLETED = "COMPLETED"
    DELETING = "DELETING"
    DELETED = "DELETED"


class ReplicationRunType(_StrEnum):
    ON_DEMAND = "ON_DEMAND"
    AUTOMATIC = "AUTOMATIC"


#: job states that count as "still replicating" (the active-jobs limit, one job per server)
LIVE_JOB_STATES = frozenset({ReplicationJobState.PENDING, ReplicationJobState.ACTIVE,
                             ReplicationJobState.FAILING,
                             ReplicationJobState.PAUSED_ON_FAILURE})
#: run states in which a run still occupies its job
BUSY_RUN_STATES = frozenset({ReplicationRunState.PENDING, ReplicationRunState.ACTIVE})
#: job states GetServers reports as ``replicationJobTerminated``: the job is gone or gave
#: up.  A COMPLETED job (run-once done, replication window closed) ended as planned.
TERMINATED_JOB_STATES = frozenset({ReplicationJobState.DELETED, ReplicationJobState.FAILED})


# --- ids -----------------------------------------------------------------------

# Check with ``fullmatch``; the \A...\Z anchors keep even a ``match`` from letting a
# trailing newline through (``$`` would).
CONNECTOR_ID = re.compile(r"\Ac-[0-9a-f]{17}\Z")
SERVER_ID = re.compile(r"\As-[0-9a-f]{8}\Z")
JOB_ID = re.compile(r"\Asms-job-[0-9a-f]{8}\Z")
RUN_ID = re.compile(r"\Asms-run-[0-9a-f]{8}\Z")
#: an IAM role name (IAM's ``[\w+=,.@-]+``, 1-64 characters, where ``\w`` is ASCII)
ROLE_NAME = re.compile(r"[A-Za-z0-9_+=,.@-]{1,64}", re.ASCII)


def _hex(n: int) -> str:
    return secrets.token_hex((n + 1) // 2)[:n]


def new_connector_id() -> str:
    return "c-" + _hex(17)


def new_server_id() -> str:
    return "s-" + _hex(8)


def new_job_id() -> str:
    return "sms-job-" + _hex(8)


def new_run_id() -> str:
    return "sms-run-" + _hex(8)


# --- guest operating system ------------------------------------------------------

# VMware's guest OS ids: the .vmx ``guestOS`` ("ubuntu-64", "rhel8-64", "windows9srv-64")
# and vCenter's ``config.guestId`` ("ubuntu64Guest", "rhel8_64Guest", "windows9Server64Guest")
# name the same families with the same stems.
_LINUX_GUEST = re.compile(
    r"(ubuntu|rhel|redhat|centos|debian|sles|suse|opensuse|fedora|mandrake|mandriva|asianux|"
    r"coreos|photon|vmwarephoton|vmware-photon|nld|sjds|rocky|alma|miracle|pardus|fusionos|"
    r"kylin|prolinux|turbolinux|oracle|amazon|amazonlinux|otherlinux|other\d*xlinux|"
    r"genericlinux)", re.IGNORECASE)
_WINDOWS_GUEST = re.compile(r"(win|windows|longhorn)", re.IGNORECASE)


def guest_os_family(guest_os) -> str | None:
    """"linux", "windows" or None (another OS, or not known) for a VMware guest OS id."""
    if not isinstance(guest_os, str) or not guest_os:
        return None
    if _WINDOWS_GUEST.match(guest_os):
        return "windows"
    if _LINUX_GUEST.match(guest_os) or "linux" in guest_os.lower():
        return "linux"
    return None


# --- timestamps ----------------------------------------------------------------

MAX_ECHO = 80          # characters of a client's value quoted back in an error message
MAX_MESSAGE = 1024     # characters of any error message an operation answers with
MAX_FAILURE_REASON = 400   # characters of a failed run's reason kept in statusMessage


_EPOCH_TEXT = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,9})?")


def echo(value, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for quoting what a client (or
    a source) sent in an error message without sending all of it back."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + "…"
    text = repr(value)
    return text if len(text) <= limit + 2 else text[:limit] + "…"


def bounded_message(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` cut to ``limit`` characters."""
    return message if len(message) <= limit else message[:limit - 1] + "…"


def utc(dt: datetime) -> datetime:
    """``dt`` as an aware UTC datetime (naive values are taken as UTC)."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def parse_timestamp(value, name: str = "timestamp") -> datetime:
    """An SMS timestamp from epoch seconds (number or numeric string) or ISO 8601 text."""
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, bool):
        raise ServiceError(f"{name}: expected a timestamp, got {echo(value)}", "InvalidParameterException")
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(float(value), tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ServiceError(f"{name}: {echo(value)} is out of range", "InvalidParameterException") from None
    if isinstance(value, str):
        # epoch seconds as plain ASCII decimal text only: float() would also take
        # "1_796_280_000", other scripts' digits, whitespace, "+1e9" and "nan"
        if _EPOCH_TEXT.fullmatch(value):
            return parse_timestamp(float(value), name)
        text = value
        if len(text) > 64 or not text.isascii() or not text[:1].isdigit() \
                or not text[-1:].isalnum():
            raise ServiceError(f"{name}: {echo(value)} is neither ISO 8601 nor epoch seconds",
                               "InvalidParameterException")
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            return utc(datetime.fromisoformat(text))
        except ValueError:
            pass
    raise ServiceError(f"{name}: {echo(value)} is neither ISO 8601 nor epoch seconds",
                       "InvalidParameterException")


def to_epoch(dt: datetime | None) -> float | None:
    return None if dt is None else round(utc(dt).timestamp(), 3)


# --- records ---------------------------------------------------------------------

class _Record:
    """Shared ``to_api``: wire names, enums as strings, datetimes as epoch seconds, no Nones."""

    _internal: tuple[str, ...] = ()

    def to_api(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name in self._internal:
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = _wire(value)
        return out


def _wire(value):
    if isinstance(value, datetime):
        return to_epoch(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, _Record):
        return value.to_api()
    if isinstance(value, list):
        return [_wire(v) for v in value]
    return value


@dataclass
class Connector(_Record):
    connectorId: str
    version: str
    status: ConnectorStatus
    capabilityList: list[ConnectorCapability]
    vmManagerName: str
    vmManagerType: VmManagerType
    vmManagerId: str
    ipAddress: str | None = None
    macAddress: str | None = None
    associatedOn: datetime | None = None


@dataclass
class VmServerAddress(_Record):
    vmManagerId: str
    vmId: str


@dataclass
class VmServer(_Record):
    vmServerAddress: VmServerAddress
    vmName: str
    vmManagerName: str
    vmManagerType: VmManagerType
    vmPath: str


@dataclass
class Server(_Record):
    serverId: str
    serverType: ServerType
    vmServer: VmServer
    replicationJobId: str | None = None
    replicationJobTerminated: bool | None = None


@dataclass
class ReplicationRunStageDetails(_Record):
    stage: str | None = None
    stageProgress: str | None = None


@dataclass
class ReplicationRun(_Record):
    replicationRunId: str
    state: ReplicationRunState
    type: ReplicationRunType
    stageDetails: ReplicationRunStageDetails | None = None
    statusMessage: str | None = None
    amiId: str | None = None
    scheduledStartTime: datetime | None = None
    completedTime: datetime | None = None
    description: str | None = None
    encrypted: bool | None = None
    kmsKeyId: str | None = None


@dataclass
class ReplicationJob(_Record):
    replicationJobId: str
    serverId: str
    serverType: ServerType
    vmServer: VmServer | None
    seedReplicationTime: datetime
    frequency: int | None
    runOnce: bool
    nextReplicationRunStartTime: datetime | None
    licenseType: LicenseType
    roleName: str | None
    latestAmiId: str | None
    state: ReplicationJobState
    statusMessage: str | None
    description: str | None
    numberOfRecentAmisToKeep: int
    encrypted: bool
    kmsKeyId: str | None
    replicationRunList: list[ReplicationRun] = field(default_factory=list)
