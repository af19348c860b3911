"""What a connector needs from the control plane, in two implementations.

:class:`LocalControlPlane` calls :class:`~smsblock.service.fleet.Fleet` on the state in
the connector's own process (``connector run --state DIR``: connector and control plane
on one machine, as before).  :class:`RemoteControlPlane` makes the same calls over
HTTP(S) to ``smsblock serve`` (``connector run --connector-dir DIR``): each one a POST
signed with SigV4 by botocore (the connector's own credential, service ``sms``),
``X-Amz-Target: SmsBlockFleet_20261201.<Op>`` and a JSON body, verified against
``--ca-bundle`` (or the system CAs; ``--insecure`` turns verification off, on purpose
only), through ``HTTPS_PROXY``/``NO_PROXY`` like any AWS client.

Both answer in the same shapes (the fleet operations' wire form), so the executor and
the connector loop do not know which one they talk to.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..backend.retry import RetryPolicy
from ..errors import ConnectorError, ServiceError, TransientStoreError
from .fleet import STALE_CLAIM, TARGET_PREFIX, Fleet

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-amz-json-1.1"
SERVICE_NAME = "sms"
MAX_ANSWER = 8 << 20        # bytes of one answer read at most
#: a busy (503, 429) or unreachable control plane is asked again with backoff for up to
#: a minute: a fleet's connectors must ride out a restart or a burst, not fail their runs
RETRY = dict(attempts=10, seconds=60.0, base_delay=0.2, max_delay=8.0)


class _Busy(ConnectionError):
    """The control plane answered 503 or 429 (transient for the retry policy)."""


def is_stale(error: BaseException) -> bool:
    """Whether ``error`` says the run was reassigned (the claim is stale)."""
    return isinstance(error, ServiceError) and error.code == STALE_CLAIM


class LocalControlPlane:
    """The fleet operations on the state, in this process.  ``connector_id`` None: runs
    are claimed for the connector of their server (an executor used on its own)."""

    remote = False

    def __init__(self, fleet: Fleet, connector_id: str | None = None):
        self.fleet = fleet
        self.connector_id = connector_id

    def describe(self) -> dict:
        return self.fleet.describe(self.connector_id)

    def heartbeat(self, runs: dict[str, int]) -> dict:
        return self.fleet.heartbeat(self.connector_id, runs)

    def tick(self) -> list[str]:
        return self.fleet.tick(self.connector_id)

    def due_runs(self) -> list[str]:
        return self.fleet.due_runs(self.connector_id)

    def claim(self, run_id: str) -> dict | None:
        return self.fleet.claim(self.connector_id, run_id, with_source=True)

    def report(self, claim: dict, **cols) -> str | None:
        return self.fleet.report(claim["claimedBy"], claim["run"]["run_id"], claim["fence"],
                                 **cols)["cancel"]

    def complete(self, claim: dict, ami_id: str | None, summary: dict, message: str) -> dict:
        return self.fleet.complete(claim["claimedBy"], claim["run"]["run_id"], claim["fence"],
                                   summary, message, ami_id)

    def fail(self, claim: dict, reason: str, cancelled_by_deletion: bool = False) -> str:
        return self.fleet.fail(claim["claimedBy"], claim["run"]["run_id"], claim["fence"],
                               reason, cancelled_by_deletion)["state"]

    def end_deleted(self, claim: dict, detail: str) -> str:
        return self.fleet.end_deleted(claim["claimedBy"], claim["run"]["run_id"],
                                      claim["fence"], detail)["state"]

    def images_deregistered(self, claim: dict, ami_ids: list[str]) -> None:
        self.fleet.images_deregistered(claim["claimedBy"], ami_ids)

    def deleting_jobs(self) -> list[dict]:
        return self.fleet.deleting_jobs(self.connector_id)

    def finish_job_deletion(self, job_id: str) -> bool:
        return self.fleet.finish_job_deletion(self.connector_id, job_id)["deleted"]


class RemoteControlPlane:
    """The fleet operations over HTTP(S) to ``smsblock serve``, signed with the
    connector's credential.  ``source_kind``/``source_config`` are the connector's own
    source (the control plane keeps only the catalog it uploaded)."""

    remote = True

    def __init__(self, endpoint: str, access_key_id: str, secret_access_key: str,
                 connector_id: str, *, region: str = "us-east-1", ca_bundle: str | None = None,
                 insecure: bool = False, timeout: float = 30.0,
                 source_kind: str | None = None, source_config: dict | None = None,
                 retry: RetryPolicy | None = None):
        from botocore.httpsession import URLLib3Session
        from botocore.utils import get_environ_proxies
        if not endpoint.startswith(("https://", "http://")):
            raise ConnectorError(f"--endpoint {endpoint[:80]!r} is not an http(s):// URL")
        self.endpoint = endpoint.rstrip("/")
        self.connector_id = connector_id
        self.region = region
        self._key = (access_key_id, secret_access_key)
        self.source_kind, self.source_config = source_kind, source_config or {}
        verify: bool | str = False if insecure else (ca_bundle or True)
        # HTTPS_PROXY / NO_PROXY as every AWS client reads them
        self._session = URLLib3Session(verify=verify, proxies=get_environ_proxies(self.endpoint),
                                       timeout=timeout)
        self.retry = retry if retry is not None else RetryPolicy(**RETRY)

    def __repr__(self) -> str:     # never the secret
        return f"RemoteControlPlane({self.endpoint!r}, connector {self.connector_id})"

    def close(self) -> None:
        self._session.close()

    def call(self, operation: str, *, prefix: str = TARGET_PREFIX, **params) -> dict:
        """One fleet operation (``prefix``: of another API); raises ServiceError with the
        server's code and message, ConnectorError when the control plane cannot be
        reached or stays busy (connection failures, 503 and 429 are retried under
        :attr:`retry`: exponential backoff with jitter, a minute by default)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
        from botocore.exceptions import SSLError
        body = json.dumps({k: v for k, v in params.items() if v is not None}).encode()

        def send() -> dict:
            req = AWSRequest(method="POST", url=self.endpoint + "/", data=body,
                             headers={"Content-Type": CONTENT_TYPE,
                                      "X-Amz-Target": prefix + operation})
            SigV4Auth(Credentials(*self._key), SERVICE_NAME, self.region).add_auth(req)
            try:
                resp = self._session.send(req.prepare())
            except SSLError as e:
                raise ConnectorError(f"control plane {self.endpoint}: TLS failed: {e} (give its CA "
                                     "with --ca-bundle)") from None
            content = resp.content[:MAX_ANSWER]
            try:
                answer = json.loads(content) if content else {}
            except ValueError:
                answer = None
            if resp.status_code == 200 and isinstance(answer, dict):
                return answer
            if resp.status_code in (429, 503):
                raise _Busy(f"{operation} answered HTTP {resp.status_code} (busy)")
            if isinstance(answer, dict) and "__type" in answer:
                raise ServiceError(str(answer.get("message", ""))[:1000], str(answer["__type"]))
            raise ConnectorError(f"control plane {self.endpoint}: {operation} answered HTTP "
                                 f"{resp.status_code} without an SMS error")
        try:
            return self.retry.call(f"control plane {self.endpoint}: {operation}", send)
        except TransientStoreError as e:
            raise ConnectorError(f"{e} (the control plane cannot be reached or is busy)") from None

    # --- the connector's operations -------------------------------------------------

    def register(self, manager_name: str, manager_type: str, manager_id: str,
                 **extra) -> dict:
        return self.call("RegisterConnector", connectorId=self.connector_id,
                         sourceKind=self.source_kind, vmManagerName=manager_name,
                         vmManagerType=manager_type, vmManagerId=manager_id, **extra)

    def describe(self) -> dict:
        return self.call("DescribeConnector", connectorId=self.connector_id)

    def heartbeat(self, runs: dict[str, int]) -> dict:
        return self.call("Heartbeat", connectorId=self.connector_id, runs=runs)

    def tick(self) -> list[str]:
        return self.call("Tick", connectorId=self.connector_id)["scheduled"]

    def upload_catalog(self, vms: list[dict], problems: list[dict]) -> dict:
        return self.call("UploadCatalog", connectorId=self.connector_id, vms=vms,
                         problems=problems)

    def due_runs(self) -> list[str]:
        return self.call("GetDueRuns", connectorId=self.connector_id)["runIds"]

    def claim(self, run_id: str) -> dict | None:
        claim = self.call("ClaimRun", connectorId=self.connector_id, runId=run_id).get("claim")
        if claim is not None:      # runs are read with this connector's own source
            claim["sourceKind"], claim["sourceConfig"] = self.source_kind, self.source_config
        return claim

    def _held(self, op: str, claim: dict, **params) -> dict:
        return self.call(op, connectorId=self.connector_id, runId=claim["run"]["run_id"],
                         fence=claim["fence"], **params)

    def report(self, claim: dict, *, stage=None, stage_progress=None, status_message=None,
               store_run_id=None, summary=None, moved_to=None) -> str | None:
        return self._held("ReportRun", claim, stage=stage, stageProgress=stage_progress,
                          statusMessage=status_message, storeRunId=store_run_id,
                          summary=summary, movedTo=moved_to).get("cancel")

    def complete(self, claim: dict, ami_id: str | None, summary: dict, message: str) -> dict:
        return self._held("CompleteRun", claim, amiId=ami_id, summary=summary, message=message)

    def fail(self, claim: dict, reason: str, cancelled_by_deletion: bool = False) -> str:
        return self._held("FailRun", claim, reason=reason[:4096],
                          cancelledByDeletion=cancelled_by_deletion)["state"]

    def end_deleted(self, claim: dict, detail: str) -> str:
        return self._held("EndRunDeleted", claim, detail=detail[:4096])["state"]

    def images_deregistered(self, claim: dict, ami_ids: list[str]) -> None:
        self.call("ImagesDeregistered", connectorId=self.connector_id, amiIds=ami_ids)

    def deleting_jobs(self) -> list[dict]:
        return self.call("GetDeletingJobs", connectorId=self.connector_id)["jobs"]

    def finish_job_deletion(self, job_id: str) -> bool:
        return self.call("FinishJobDeletion", connectorId=self.connector_id,
                         jobId=job_id)["deleted"]


def source_identity(source: Any) -> dict:
    """What RegisterConnector says of a source."""
    return {"manager_name": source.manager_name, "manager_type": source.manager_type,
            "manager_id": source.manager_id}
