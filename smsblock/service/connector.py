"""The connector process: heartbeat, schedule, execute due runs, finish deletions.

``smsblock connector run --state DIR [--once]`` runs :class:`ConnectorLoop`.  One pass
(:meth:`ConnectorLoop.run_once`) does, in order:

1. heartbeat (the connector is HEALTHY while heartbeats are younger than
   ``heartbeat_timeout_seconds``; a thread keeps beating while a long run executes);
2. on the first pass only, fail the runs a dead process of this connector left ACTIVE;
3. let the scheduler create the AUTOMATIC runs that are due (and MISSED ones);
4. finish DELETING jobs of its servers: remove their blocks from the store, then DELETED;
5. execute the due PENDING runs of its servers, oldest first, one at a time (a run whose
   job is deleted meanwhile ends DELETED: ``deleted_runs``).

A file lock (``STATE/connector-<id>.lock``) keeps a second process of the same
connector out, which is what makes step 2 safe.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

from ..errors import ConnectorError, SmsBlockError, StoreError
from ..fsutil import open_lock_file
from ..progress import CancelToken
from .api import SmsService
from .executor import RunExecutor
from .models import ReplicationJobState, ReplicationRunState

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
    """One connector's work loop over a :class:`SmsService`'s state."""

    def __init__(self, service: SmsService, connector_id: str | None = None, *,
                 executor: RunExecutor | None = None, heartbeat_interval: float = 30.0):
        self.service = service
        self.connector_id = pick_connector(service, connector_id)
        self.stop = CancelToken()
        self.executor = executor or RunExecutor(service.state, service.clock, stop=self.stop,
                                                config=service.config)
        if self.executor.stop is None:
            self.executor.stop = self.stop
        self.heartbeat_interval = heartbeat_interval
        self._lock_file = None
        self._recovered = False

    # --- the process lock -------------------------------------------------------------

    def __enter__(self) -> "ConnectorLoop":
        path = Path(self.service.state.dir) / f"connector-{self.connector_id}.lock"
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
                                      "completed": [], "failed": [], "deleted_runs": []}
        row = self.service.state.query("SELECT disassociated_on FROM connectors WHERE "
                                       "connector_id = ?", (self.connector_id,))
        if not row or row[0][0] is not None:
            self.stop.cancel("disassociated")
            raise ConnectorError(f"connector {self.connector_id} was disassociated; "
                                 "register a new one")
        self._beat()
        if not self._recovered:
            done["recovered"] = self.executor.recover_orphaned_runs(self.connector_id)
            self._recovered = True
        done["scheduled"] = self.service.tick()
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
            self.stop._event.wait(poll_interval)

    def _beat(self) -> None:
        self.service.heartbeat(self.connector_id)

    def due_runs(self) -> list[str]:
        rows = self.service.state.query(
            "SELECT r.run_id FROM runs r JOIN jobs j ON j.job_id = r.job_id "
            "JOIN servers s ON s.server_id = j.server_id "
            "WHERE s.connector_id = ? AND r.state = ? AND r.scheduled_start <= ? "
            "ORDER BY r.scheduled_start, r.created",
            (self.connector_id, ReplicationRunState.PENDING.value, self.service.clock()))
        return [r["run_id"] for r in rows]

    def finish_deletions(self) -> list[str]:
        """DELETING jobs of this connector without an active run: remove blocks, DELETED."""
        from ..engine import prune
        from ..store import open_store

        rows = self.service.state.query(
            "SELECT j.job_id, j.server_id, c.store FROM jobs j "
            "JOIN servers s ON s.server_id = j.server_id "
            "JOIN connectors c ON c.connector_id = s.connector_id "
            "WHERE s.connector_id = ? AND j.state = ? AND NOT EXISTS "
            "(SELECT 1 FROM runs r WHERE r.job_id = j.job_id AND r.state = ?)",
            (self.connector_id, ReplicationJobState.DELETING.value,
             ReplicationRunState.ACTIVE.value))
        finished = []
        for row in rows:
            try:
                store = open_store(row["store"])
                if store.exists():
                    server_id = row["server_id"]
                    keys = [k for k in store.list_servers()
                            if k == server_id or k.startswith(f"{server_id}-disk")]
                    for k in keys:
                        prune(store, k, 0)
            except StoreError as e:
                log.warning("deleting job %s: cannot remove its blocks yet: %s", row["job_id"], e)
                continue
            with self.service.state.transaction() as db:
                db.execute("UPDATE jobs SET state = ?, status_message = ? WHERE job_id = ? "
                           "AND state = ?",
                           (ReplicationJobState.DELETED.value,
                            "deleted; its replicated blocks were removed, its images kept",
                            row["job_id"], ReplicationJobState.DELETING.value))
            finished.append(row["job_id"])
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
                self.loop._beat()
            except SmsBlockError as e:
                log.warning("heartbeat failed: %s", e)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
