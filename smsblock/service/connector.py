"""The connector process: heartbeat, schedule, execute due runs, finish deletions.

``smsblock connector run --state DIR [--once]`` runs :class:`ConnectorLoop` on the
control plane's state in this process (:class:`~.controlplane.LocalControlPlane`);
``smsblock connector run --connector-dir DIR`` runs it against a remote ``smsblock
serve`` over HTTP(S) (:class:`~.controlplane.RemoteControlPlane`, see docs/fleet.md).
One pass (:meth:`ConnectorLoop.run_once`) does, in order:

1. heartbeat (the connector is HEALTHY while heartbeats are younger than
   ``heartbeat_timeout_seconds``; a thread keeps beating while a long run executes, and
   each beat renews the lease of the run it holds; a run the control plane says it lost
   - reassigned after its lease ran out - is stopped and its result discarded);
2. on the first pass only, local mode: fail the runs a dead process of this connector
   left ACTIVE (a remote connector's runs are released by their leases instead);
   remote mode: upload the source's VM list (again every ``catalog_interval`` seconds);
3. let the scheduler create the AUTOMATIC runs that are due (and MISSED ones);
4. finish DELETING jobs of its servers: remove their blocks from the store, then DELETED;
5. execute the runs it can claim (see :mod:`smsblock.service.fleet`), oldest first, one
   at a time (a run whose job is deleted meanwhile ends DELETED: ``deleted_runs``; one
   reassigned meanwhile: ``lost``).

A file lock (``STATE/connector-<id>.lock``, or ``CONNECTOR_DIR/connector.lock``) keeps a
second process of the same connector out, which is what makes step 2 safe.
"""

from __future__ import annotations

import fcntl
import inspect
import logging
import os
import threading
import time
from pathlib import Path

from ..errors import ConnectorError, SmsBlockError, StoreError
from ..fsutil import open_lock_file
from ..progress import CancelToken
from .api import SmsService
from .executor import LOST, RunExecutor
from .fleet import Fleet, MAX_CATALOG_VMS
from .models import ReplicationRunState

log = logging.getLogger(__name__)


def pick_connector(service: SmsService, connector_id: str | None) -> str:
    """The given connector, or the only associated one."""
    rows = service.state.query("SELECT connector_id FROM connectors WHERE disassociated_on IS NULL "
                               "ORDER BY associated_on")
    ids = [r["connector_id"] for r in rows]
    if connector_id is not None:
        if connector_id not in ids:
            raise ConnectorError(f"connector {connector_id} is not associated in {service.state.dir}")
        return connector_id
    if not ids:
        raise ConnectorError(f"no connector is associated in {service.state.dir}; "
                             "run `smsblock connector register` first")
    if len(ids) > 1:
        raise ConnectorError(f"{len(ids)} connectors are associated in {service.state.dir}; "
                             f"pick one with --connector-id ({', '.join(ids)})")
    return ids[0]


class ConnectorLoop:
    """One connector's work loop: over a :class:`SmsService`'s state (``service``), or
    over a remote control plane (``control_plane``, with ``lock_dir`` for the process
    lock and the connector's own ``source_kind``/``source_config`` for its catalog)."""

    def __init__(self, service: SmsService | None = None, connector_id: str | None = None, *,
                 executor: RunExecutor | None = None, heartbeat_interval: float = 30.0,
                 control_plane=None, lock_dir: str | os.PathLike | None = None,
                 catalog_interval: float = 3600.0):
        self.service = service
        self.stop = CancelToken()
        if control_plane is None:
            from .controlplane import LocalControlPlane
            self.connector_id = pick_connector(service, connector_id)
            control_plane = LocalControlPlane(Fleet(service.state, service.clock,
                                                    service.config), self.connector_id)
            self.lock_path = Path(service.state.dir) / f"connector-{self.connector_id}.lock"
            self.executor = executor or RunExecutor(service.state, service.clock, stop=self.stop,
                                                    config=service.config)
            # the executor claims for this connector (one built on its own claims for
            # the server's connector)
            if not getattr(self.executor.cp, "remote", False):
                self.executor.cp.connector_id = self.connector_id
        else:
            self.connector_id = control_plane.connector_id
            self.lock_path = Path(lock_dir) / "connector.lock"
            self.executor = executor or RunExecutor(None, time.time, stop=self.stop,
                                                    control_plane=control_plane)
        self.cp = control_plane
        if self.executor.stop is None:
            self.executor.stop = self.stop
        self.heartbeat_interval = heartbeat_interval
        self.catalog_interval = catalog_interval
        self._catalog_uploaded = None
        self._lock_file = None
        self._recovered = False

    @property
    def remote(self) -> bool:
        return bool(getattr(self.cp, "remote", False))

    # --- the process lock -------------------------------------------------------------

    def __enter__(self) -> "ConnectorLoop":
        path = self.lock_path
        try:    # 0600, never through a link: the pid is written into it
            f = open(path, "a+", opener=lambda p, _flags: open_lock_file(p))
        except OSError as e:
            raise ConnectorError(f"{path}: cannot open the connector lock: {e.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConnectorError(f"connector {self.connector_id} is already running "
                                 f"(pid {holder})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_file is not None:
            self._lock_file.close()   # releases the lock
            self._lock_file = None

    # --- one pass -------------------------------------------------------------------------

    def run_once(self) -> dict:
        """Do what is due now; return what was done (run ids by outcome)."""
        if self._lock_file is None:
            raise ConnectorError("ConnectorLoop.run_once needs the connector lock (use `with`)")
        done: dict[str, list[str]] = {"recovered": [], "scheduled": [], "deleted_jobs": [],
                                      "completed": [], "failed": [], "deleted_runs": [],
                                      "lost": []}
        if not self.beat()["associated"]:
            self.stop.cancel("disassociated")
            raise ConnectorError(f"connector {self.connector_id} was disassociated; "
                                 "register a new one")
        if self.remote:
            if (self._catalog_uploaded is None
                    or time.monotonic() - self._catalog_uploaded >= self.catalog_interval):
                self.upload_catalog()
        elif not self._recovered:
            done["recovered"] = self.executor.recover_orphaned_runs(self.connector_id)
            self._recovered = True
        done["scheduled"] = self.service.tick() if self.service is not None else self.cp.tick()
        done["deleted_jobs"] = self.finish_deletions()
        for run_id in self.due_runs():
            if self.stop.cancelled:
                break
            with _Heartbeat(self):
                outcome = self.executor.execute(run_id)
            if outcome == ReplicationRunState.COMPLETED.value:
                done["completed"].append(run_id)
            elif outcome == ReplicationRunState.DELETED.value:
                done["deleted_runs"].append(run_id)
            elif outcome == LOST:
                done["lost"].append(run_id)
            elif outcome is not None:
                done["failed"].append(run_id)
        # a deletion that arrived during a run can finish now
        done["deleted_jobs"] += self.finish_deletions()
        return done

    def run_forever(self, poll_interval: float = 10.0) -> None:
        """Passes every ``poll_interval`` seconds until :attr:`stop` is cancelled."""
        while not self.stop.cancelled:
            try:
                self.run_once()
            except SmsBlockError as e:   # e.g. a store briefly locked; try again next pass
                if self.stop.cancelled:
                    raise
                log.warning("connector pass failed: %s", e)
            self.stop.wait(poll_interval)

    def beat(self) -> dict:
        """Heartbeat, renewing the leases of the runs being executed; a run the control
        plane says is no longer ours is stopped."""
        held = {run_id: ctx.claim["fence"] for run_id, ctx in list(self.executor.held.items())}
        answer = self.cp.heartbeat(held)
        for run_id in answer.get("lost") or []:
            self.executor.lost(run_id, f"run {run_id} was reassigned to another connector "
                               "(this connector's lease ran out: no heartbeat within "
                               "heartbeat_timeout_seconds); its result is discarded")
        return answer

    def upload_catalog(self) -> int:
        """List the connector's own source and upload the VMs (remote mode)."""
        from .sources import open_source
        source = open_source(self.cp.source_kind, self.cp.source_config)
        try:
            takes_cancel = "cancel" in inspect.signature(source.list_vms).parameters
            vms = source.list_vms(cancel=self.stop) if takes_cancel else source.list_vms()
            problems = list(getattr(source, "list_problems", None) or [])
        finally:
            source.close()
        if len(vms) > MAX_CATALOG_VMS:
            log.warning("the source lists %d VMs; only the first %d are uploaded",
                        len(vms), MAX_CATALOG_VMS)
        self.cp.upload_catalog([vm.to_dict() for vm in vms[:MAX_CATALOG_VMS]], problems)
        self._catalog_uploaded = time.monotonic()
        return len(vms)

    def due_runs(self) -> list[str]:
        return self.cp.due_runs()

    def finish_deletions(self) -> list[str]:
        """DELETING jobs of this connector without an active run: remove blocks, DELETED."""
        from ..engine import prune
        from ..store import open_store

        finished = []
        for row in self.cp.deleting_jobs():
            try:
                store = open_store(row["store"])
                if store.exists():
                    server_id = row["serverId"]
                    keys = [k for k in store.list_servers()
                            if k == server_id or k.startswith(f"{server_id}-disk")]
                    for k in keys:
                        prune(store, k, 0)
            except StoreError as e:
                log.warning("deleting job %s: cannot remove its blocks yet: %s", row["jobId"], e)
                continue
            if self.cp.finish_job_deletion(row["jobId"]):
                finished.append(row["jobId"])
        return finished


class _Heartbeat:
    """Keeps the connector HEALTHY while a long run executes."""

    def __init__(self, loop: ConnectorLoop):
        self.loop = loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connector-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.loop.heartbeat_interval):
            try:
                self.loop.beat()
            except SmsBlockError as e:
                log.warning("heartbeat failed: %s", e)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
