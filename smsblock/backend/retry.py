"""One retry policy for every request a cloud store makes.

Transient failures (HTTP 500/502/503/504, ``SlowDown``, throttling, connection resets,
timeouts, a body cut short) are retried with exponential backoff and full jitter, within
a bounded budget: at most ``attempts`` tries and ``seconds`` of wall time per request.
Each retry is logged (logger ``smsblock.store.retry``, WARNING) with what it was doing.
Permanent failures (access denied, no such bucket, bad credentials, TLS verification)
fail at once as :class:`~smsblock.errors.PermanentStoreError` with one clear line.  Other
client errors (``NoSuchKey``, ``PreconditionFailed``...) are the caller's to interpret
and pass through unchanged.

botocore's own retries are off (see :mod:`.s3config`), so this is the only policy.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from ..errors import PermanentStoreError, TransientStoreError

log = logging.getLogger("smsblock.store.retry")
T = TypeVar("T")

#: error codes that retrying cannot fix, with a hint of what to do
PERMANENT_CODES = {
    "AccessDenied": "the credentials lack permission for this",
    "AccessDeniedException": "the credentials lack permission for this",
    "AllAccessDisabled": "access to the bucket is disabled",
    "AccountProblem": "the AWS account has a problem",
    "NoSuchBucket": "create the bucket first, or fix the store URL",
    "InvalidBucketName": "fix the bucket name in the store URL",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID, the profile or the config file",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY, the profile or the config file",
    "UnrecognizedClientException": "check the access key id",
    "InvalidClientTokenId": "check the access key id",
    "ExpiredToken": "the session token has expired",
    "ExpiredTokenException": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "AuthorizationHeaderMalformed": "check the region and the credentials",
    "PermanentRedirect": "the bucket is in another region: set region",
    "IllegalLocationConstraintException": "the bucket is in another region: set region",
}

TRANSIENT_CODES = {
    "InternalError", "InternalFailure", "InternalServerError", "InternalServerException",
    "ServiceUnavailable", "ServiceUnavailableException", "SlowDown", "RequestTimeout",
    "RequestTimeoutException", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "RequestLimitExceeded",
    "TooManyRequestsException", "BandwidthLimitExceeded", "OperationAborted",
}


def error_code(exc: BaseException) -> str | None:
    """The service's error code of a botocore ClientError (else None)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code") or None
    return None


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def _is_transport_error(exc: BaseException) -> bool:
    import botocore.exceptions as bx
    import urllib3.exceptions as ux
    from botocore.parsers import ResponseParserError
    if isinstance(exc, bx.SSLError):
        return False
    # botocore's ConnectionError covers refused connections, connect timeouts and proxy
    # failures; HTTPClientError covers resets, closed connections and read timeouts
    # ResponseParserError: an answer cut short so that its XML or JSON does not parse
    return isinstance(exc, (bx.HTTPClientError, bx.ConnectionError, bx.ResponseStreamingError,
                            bx.IncompleteReadError, ResponseParserError, ux.HTTPError,
                            ConnectionError, TimeoutError))


def classify(exc: BaseException) -> str:
    """``"transient"``, ``"permanent"`` or ``"other"`` (the caller's to interpret)."""
    import botocore.exceptions as bx
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.SSLError,
                        bx.NoRegionError, bx.ProfileNotFound, bx.ParamValidationError,
                        bx.EndpointResolutionError, bx.InvalidRegionError)):
        return "permanent"
    if isinstance(exc, bx.ClientError):
        code = error_code(exc)
        if code in PERMANENT_CODES:
            return "permanent"
        status = http_status(exc) or 0
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return "transient"
        if status in (401, 403):
            return "permanent"
        return "other"
    if _is_transport_error(exc):
        return "transient"
    return "other"


def describe(exc: BaseException) -> str:
    """A short, one-line description of an error."""
    import botocore.exceptions as bx
    if isinstance(exc, bx.ClientError):
        code = error_code(exc) or "?"
        msg = exc.response.get("Error", {}).get("Message") or ""
        status = http_status(exc)
        return f"{code}{f' (HTTP {status})' if status else ''}{f': {msg}' if msg else ''}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def permanent_message(what: str, exc: BaseException) -> str:
    import botocore.exceptions as bx
    code = error_code(exc)
    hint = PERMANENT_CODES.get(code or "", "")
    if isinstance(exc, bx.SSLError):
        hint = ("TLS verification failed: if a proxy re-signs TLS, set ca_bundle or AWS_CA_BUNDLE "
                "to its CA certificate")
    elif isinstance(exc, bx.NoCredentialsError):
        hint = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or keys in the config file"
    elif isinstance(exc, bx.NoRegionError):
        hint = "set region: AWS_DEFAULT_REGION or the config file"
    return f"{what}: {describe(exc)}{f'; {hint}' if hint else ''}"


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by ``attempts`` and ``seconds``."""

    attempts: int = 8
    seconds: float = 300.0
    base_delay: float = 0.1
    max_delay: float = 10.0

    def __post_init__(self):
        self._lock = threading.Lock()
        self.retries = 0          # total retries made through this policy (all threads)

    def delay(self, retry: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** retry))) + 0.01

    def call(self, what: str, fn: Callable[[], T], *, on_retry: Callable[[], None] | None = None) -> T:
        """``fn()`` under this policy; ``what`` names the request in logs and errors
        (e.g. ``"upload part 3 of s3://b/p/packs/ab/ab...pack"``).  ``on_retry`` runs
        before each new attempt (rewind a body, say)."""
        start = time.monotonic()
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as exc:
                kind = classify(exc)
                if kind == "permanent":
                    raise PermanentStoreError(permanent_message(what, exc)) from None
                if kind != "transient":
                    raise
                elapsed = time.monotonic() - start
                pause = self.delay(attempt - 1)
                if attempt >= self.attempts or elapsed + pause > self.seconds:
                    raise TransientStoreError(
                        f"{what}: gave up after {attempt} attempts in {elapsed:.1f} s: "
                        f"{describe(exc)}") from None
                log.warning("%s: %s; retry %d of %d in %.2f s", what, describe(exc), attempt,
                            self.attempts - 1, pause)
                with self._lock:
                    self.retries += 1
                time.sleep(pause)
                attempt += 1
                if on_retry is not None:
                    on_retry()
