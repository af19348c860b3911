"""Executing one replication run: source snapshot → engine → image step → run record.

This is the only module of the control plane that touches the engine
(:func:`smsblock.engine.replicate`) and the image step, so everything else is
testable on its own and the engine can be swapped for a fake in tests.

A run goes PENDING → ACTIVE (``stageDetails``: ``preparing``, ``uploading`` with a
percentage of the disks' bytes scanned, ``converting`` while the image step builds and
registers the image) → COMPLETED with ``amiId`` and ``completedTime``, or FAILED with
the reason in ``statusMessage``.  Each disk of the VM is one engine run in the
connector's store: the boot disk under the serverId itself (so
``smsblock restore --store STATE/store --server s-...`` gives the boot disk) and
further disks under ``<serverId>-disk<N>``.

A run whose job is deleted while it runs ends DELETED, never FAILED or COMPLETED: the
watcher cancels it at its next check, and a run that gets past the last check (its image
registered while the deletion arrived) has its image deregistered before the run is
recorded, so a deleted job never gets a new image.  The job's state is read in the
same transaction that would record the image: a deletion is either before it (no image)
or after it (the image belongs to the job, and images are kept).

Every state change is one transaction.  A process killed while a run is ACTIVE leaves
it ACTIVE; :meth:`RunExecutor.recover_orphaned_runs` (called when the connector comes
back) marks it FAILED with the reason (DELETED if its job was deleted), and the next
run resumes from the blocks already stored.  Before the image step starts, the run records the stored run the image is made
from, so a process killed between registering the image and recording the run leaves a
run that the restart completes with that image instead of an image nothing points to.

With changed block tracking (vSphere), the source gets the previous run's record (its
change ids) and the previous run's disks from the store: it reads only the changed areas
over the network and the rest from the store.  The run's record (``summary``) and its
``statusMessage`` say which method found the changes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from ..errors import Cancelled, ImageNotFoundError, SmsBlockError
from ..progress import CancelToken
from .jobs import record_run_failure
from .models import (LIVE_JOB_STATES, MAX_FAILURE_REASON, ReplicationJobState,
                     ReplicationRunState, bounded_message)
from .sources import one_line, open_source
from .state import ServiceConfig, State

log = logging.getLogger(__name__)

#: how often (seconds) progress is written to the state database and cancellation polled
PROGRESS_INTERVAL = 1.0


class ImageStep(Protocol):
    """Turns a stored run into a registered image (``ami-...``) and removes old ones."""

    def register(self, store: Any, server_id: str, run_id: str, *, name: str,
                 description: str, license_type: str, progress=None, cancel=None) -> str: ...

    def deregister(self, ami_id: str) -> None: ...

    # optional: ``find(server_id, run_id) -> [ami_id]``, the images already made from a
    # stored run, lets a run killed during registration be completed on restart




def default_replicate() -> Callable:
    """The engine's replicate, into the connector's existing store only: `connector register`
    created it, so a store gone missing (deleted, a mount point not mounted) fails the run
    instead of quietly filling a new, empty one."""
    from ..engine import replicate
    return functools.partial(replicate, create=False)


def default_image_step(state_dir) -> ImageStep:
    """The image step's local catalog at ``STATE/images``."""
    from ..image.catalog import Catalog       # imported when a run needs it: it is large
    from ..image.register import create_image
    return LocalImageStep(Catalog(Path(state_dir) / "images"), create_image)


class LocalImageStep:
    """Adapter from the image step (inspect, validate, write to the local catalog) to
    :class:`ImageStep`.  A disk that fails validation fails the run with the findings."""

    def __init__(self, catalog, create_image):
        self.catalog = catalog
        self._create = create_image

    def register(self, store, server_id, run_id, *, name, description, license_type,
                 progress=None, cancel=None) -> str:
        record = self._create(store, server_id, run_id, target="local", catalog=self.catalog,
                              license_type=license_type, name=name, description=description,
                              progress=progress, cancel=cancel)
        return record["image_id"]

    def deregister(self, ami_id: str) -> None:
        self.catalog.delete(ami_id)

    def boot_test(self, ami_id: str, cancel=None) -> tuple[bool, str]:
        """Boot the image under QEMU (docs/image.md); the result goes into its record."""
        from ..image.boottest import boot_test
        result = boot_test(ami_id, catalog=self.catalog, cancel=cancel)
        return result.ok, result.summary()

    def find(self, server_id: str, run_id: str) -> list[str]:
        """The images of the catalog made from stored run ``run_id`` of ``server_id``."""
        return [r["image_id"] for r in self.catalog.list()
                if (r.get("source") or {}).get("server_id") == server_id
                and (r.get("source") or {}).get("run_id") == run_id]


def disk_store_key(server_id: str, index: int) -> str:
    """The store's server id for disk ``index`` of a server (the boot disk is the server)."""
    return server_id if index == 0 else f"{server_id}-disk{index}"


@dataclass
class RunContext:
    run: Any
    job: Any
    server: Any
    connector: Any


_GONE = (ReplicationJobState.DELETING.value, ReplicationJobState.DELETED.value)
DELETED_MESSAGE = "replication job deleted"


def job_deleted(db, job_id: str) -> bool:
    """Whether the job is being deleted or is deleted (its runs end DELETED)."""
    row = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return row is None or row["state"] in _GONE


def _end_deleted(db, run_id: str, now: float, detail: str = "") -> None:
    db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ? WHERE run_id = ?",
               (ReplicationRunState.DELETED.value,
                f"{DELETED_MESSAGE} during the run{detail}"[:1000], now, run_id))


def fail_orphaned_runs(state: State, connector_id: str, now: float,
                       config: ServiceConfig | None = None) -> list[str]:
    """Mark FAILED every run left ACTIVE by a dead process of this connector (DELETED
    when its job was deleted meanwhile).

    Call only while holding the connector's process lock: then no live process of this
    connector can own an ACTIVE run.
    """
    config = config or ServiceConfig.load(state.dir)
    with state.transaction() as db:
        rows = db.execute(
            "SELECT r.run_id, r.job_id FROM runs r JOIN jobs j ON j.job_id = r.job_id "
            "JOIN servers s ON s.server_id = j.server_id "
            "WHERE s.connector_id = ? AND r.state = ?",
            (connector_id, ReplicationRunState.ACTIVE.value)).fetchall()
        for r in rows:
            if job_deleted(db, r["job_id"]):
                _end_deleted(db, r["run_id"], now, " (the connector had stopped)")
                continue
            reason = ("the connector stopped while the run was active (killed or crashed); "
                      "the next run resumes from the blocks already stored")
            db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ? "
                       "WHERE run_id = ?",
                       (ReplicationRunState.FAILED.value, f"FAILED: {reason}", now, r["run_id"]))
            record_run_failure(db, r["job_id"], r["run_id"], reason, config)
    return [r["run_id"] for r in rows]


class RunExecutor:
    """Executes runs of one connector; ``replicate`` and ``image_step`` are injectable."""

    def __init__(self, state: State, clock: Callable[[], float], *,
                 replicate: Callable | None = None, image_step: ImageStep | None = None,
                 use_default_image_step: bool = True, stop: CancelToken | None = None,
                 config: ServiceConfig | None = None):
        self.state = state
        self.clock = clock
        self.config = config or ServiceConfig.load(state.dir)
        self._replicate = replicate
        self.image_step = image_step
        if image_step is None and use_default_image_step:
            self.image_step = default_image_step(state.dir)
        self.stop = stop

    # --- state changes (each one transaction) --------------------------------------

    def _update_run(self, run_id: str, **cols) -> None:
        sets = ", ".join(f"{k} = ?" for k in cols)
        with self.state.transaction() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", (*cols.values(), run_id))

    def _claim(self, run_id: str) -> RunContext | None:
        """PENDING → ACTIVE; None when the run is no longer pending (deleted, taken)."""
        now = self.clock()
        with self.state.transaction() as db:
            run = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if run is None or run["state"] != ReplicationRunState.PENDING.value:
                return None
            job = db.execute("SELECT * FROM jobs WHERE job_id = ?", (run["job_id"],)).fetchone()
            server = db.execute("SELECT * FROM servers WHERE server_id = ?",
                                (job["server_id"],)).fetchone()
            db.execute("UPDATE runs SET state = ?, started = ?, stage = ?, stage_progress = ?, "
                       "status_message = ? WHERE run_id = ?",
                       (ReplicationRunState.ACTIVE.value, now, "preparing", "0%",
                        "taking a snapshot of the VM's disks", run_id))
            if job["state"] == ReplicationJobState.PENDING.value:
                db.execute("UPDATE jobs SET state = ? WHERE job_id = ?",
                           (ReplicationJobState.ACTIVE.value, job["job_id"]))
            if server["first_run_time"] is None:   # the replication window starts now
                db.execute("UPDATE servers SET first_run_time = ? WHERE server_id = ?",
                           (now, server["server_id"]))
        return self._context(run_id)

    def _fail(self, ctx: RunContext, reason: str) -> str:
        """The run ends FAILED, or DELETED when its job was deleted; returns the state."""
        # the reason may quote .vmx content or paths: statusMessage stays short
        reason = bounded_message(reason, MAX_FAILURE_REASON)
        now = self.clock()
        with self.state.transaction() as db:
            if job_deleted(db, ctx.job["job_id"]):
                cancelled = _DELETED_CANCEL in reason
                _end_deleted(db, ctx.run["run_id"], now,
                             "" if cancelled else f" (the run had stopped: {reason})")
                return ReplicationRunState.DELETED.value
            db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ? "
                       "WHERE run_id = ?",
                       (ReplicationRunState.FAILED.value, f"FAILED: {reason}", now,
                        ctx.run["run_id"]))
            record_run_failure(db, ctx.job["job_id"], ctx.run["run_id"], reason, self.config)
        return ReplicationRunState.FAILED.value

    def _complete(self, ctx: RunContext, ami_id: str | None, summary: dict, message: str) -> str:
        """Record the run COMPLETED with its image, or - when the job was deleted - end it
        DELETED and deregister the image it made; returns the run's state."""
        now = self.clock()
        run_id, job_id = ctx.run["run_id"], ctx.job["job_id"]
        doomed: list[str] = []
        orphan = None
        # the job's state is read in the transaction that records the image: a deletion
        # committed before it means no image, one after it finds the image recorded
        with self.state.transaction() as db:
            if job_deleted(db, job_id):
                if ami_id is None:
                    _end_deleted(db, run_id, now)
                    return ReplicationRunState.DELETED.value
                # the run stays ACTIVE (with its store_run_id) until the image is gone:
                # a crash in between is settled by recover_orphaned_runs, which finds the
                # image and comes back here
                orphan = ami_id
            else:
                doomed = self._record_completed(db, ctx, ami_id, summary, message, now)
        if orphan is not None:
            return self._drop_image_of_deleted_job(ctx, orphan)
        for ami in doomed:     # outside the transaction: the image step may be slow
            try:
                self.image_step.deregister(ami)
            except ImageNotFoundError:
                pass   # already gone (deleted by hand): record it as deregistered
            except SmsBlockError as e:   # tried again when the next image is registered
                log.warning("could not deregister old image %s of job %s: %s", ami, job_id, e)
                continue
            with self.state.transaction() as db:
                db.execute("UPDATE images SET deregistered = ? WHERE ami_id = ?",
                           (self.clock(), ami))
        return ReplicationRunState.COMPLETED.value

    def _drop_image_of_deleted_job(self, ctx: RunContext, ami_id: str) -> str:
        run_id = ctx.run["run_id"]
        detail = f"; its image {ami_id} was deregistered"
        try:
            self.image_step.deregister(ami_id)
        except ImageNotFoundError:
            pass
        except SmsBlockError as e:
            log.warning("run %s: could not deregister image %s of deleted job %s: %s",
                        run_id, ami_id, ctx.job["job_id"], e)
            detail = f"; its image {ami_id} could not be deregistered: {one_line(e)}"
        with self.state.transaction() as db:
            _end_deleted(db, run_id, self.clock(), detail)
        return ReplicationRunState.DELETED.value

    def _record_completed(self, db, ctx: RunContext, ami_id: str | None, summary: dict,
                          message: str, now: float) -> list[str]:
        """Inside the caller's transaction: the run COMPLETED, its image recorded, the job
        moved on; returns the job's images to deregister (numberOfRecentAmisToKeep)."""
        run_id, job_id = ctx.run["run_id"], ctx.job["job_id"]
        doomed: list[str] = []
        db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ?, ami_id = ?, "
                   "stage = NULL, stage_progress = NULL, store_run_id = ?, summary = ? "
                   "WHERE run_id = ?",
                   (ReplicationRunState.COMPLETED.value, message, now, ami_id,
                    summary.get("disks", [{}])[0].get("run_id"), json.dumps(summary), run_id))
        job = db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        sets = {"status_message": f"run {run_id} completed"
                + (f": image {ami_id}" if ami_id else "")}
        if ami_id:
            sets["latest_ami_id"] = ami_id
            db.execute("INSERT INTO images (ami_id, job_id, run_id, created) VALUES (?,?,?,?)",
                       (ami_id, job_id, run_id, now))
            keep = job["amis_to_keep"]
            if keep > 0:
                live = db.execute("SELECT ami_id FROM images WHERE job_id = ? AND "
                                  "deregistered IS NULL ORDER BY created DESC, rowid DESC",
                                  (job_id,)).fetchall()
                doomed = [r["ami_id"] for r in live[keep:]]
        if ReplicationJobState(job["state"]) in LIVE_JOB_STATES:
            # a completed run ends FAILING / PAUSED_ON_FAILURE; run-once jobs are done
            if job["run_once"]:
                sets["state"] = ReplicationJobState.COMPLETED.value
                sets["next_run_time"] = None
            else:
                sets["state"] = ReplicationJobState.ACTIVE.value
        cols = ", ".join(f"{k} = ?" for k in sets)
        db.execute(f"UPDATE jobs SET {cols} WHERE job_id = ?", (*sets.values(), job_id))
        return doomed

    # --- restart --------------------------------------------------------------------

    def recover_orphaned_runs(self, connector_id: str) -> list[str]:
        """Settle the runs a dead process of this connector left ACTIVE (call only while
        holding the connector's lock).  A run killed after its image was registered but
        before it was recorded is COMPLETED with that image, so no image is left that
        nothing points to (when its job was deleted meanwhile, the image is deregistered
        and the run ends DELETED); every other one is FAILED with the reason (DELETED for
        a deleted job)."""
        find = getattr(self.image_step, "find", None)
        rows = self.state.query(
            "SELECT r.run_id FROM runs r JOIN jobs j ON j.job_id = r.job_id "
            "JOIN servers s ON s.server_id = j.server_id WHERE s.connector_id = ? "
            "AND r.state = ? AND r.store_run_id IS NOT NULL",
            (connector_id, ReplicationRunState.ACTIVE.value)) if find else []
        recovered = []
        for row in rows:
            ctx = self._context(row["run_id"])
            amis = find(ctx.server["server_id"], ctx.run["store_run_id"])
            if not amis:
                continue
            summary = json.loads(ctx.run["summary"] or "{}")
            for extra in amis[1:]:    # cannot happen unless registration ran twice
                self.image_step.deregister(extra)
            # (a job deleted meanwhile: the run ends DELETED and the image is deregistered)
            self._complete(ctx, amis[0], summary,
                           f"completed: image {amis[0]} (registered before the connector "
                           "stopped; recorded when it came back)")
            recovered.append(row["run_id"])
        failed = fail_orphaned_runs(self.state, connector_id, self.clock(), self.config)
        return recovered + failed

    def _context(self, run_id: str) -> RunContext:
        with self.state.transaction() as db:
            run = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            job = db.execute("SELECT * FROM jobs WHERE job_id = ?", (run["job_id"],)).fetchone()
            server = db.execute("SELECT * FROM servers WHERE server_id = ?",
                                (job["server_id"],)).fetchone()
            connector = db.execute("SELECT * FROM connectors WHERE connector_id = ?",
                                   (server["connector_id"],)).fetchone()
        return RunContext(run, job, server, connector)

    # --- one run --------------------------------------------------------------------

    def execute(self, run_id: str) -> str | None:
        """Run ``run_id`` if it is still PENDING; return its final state (None if not run)."""
        ctx = self._claim(run_id)
        if ctx is None:
            return None
        cancel = CancelToken()
        watcher = _Watcher(self, ctx, cancel)
        try:
            ami_id, summary, message = self._work(ctx, cancel, watcher)
        except Cancelled as e:
            return self._fail(ctx, f"cancelled: {e}")
        except (SmsBlockError, OSError) as e:
            log.warning("run %s failed: %s", run_id, e)
            return self._fail(ctx, one_line(e))
        except Exception as e:   # a bug must not leave the run ACTIVE forever
            log.exception("run %s failed unexpectedly", run_id)
            return self._fail(ctx, f"internal error: {type(e).__name__}: {one_line(e)}")
        return self._complete(ctx, ami_id, summary, message)

    def _work(self, ctx: RunContext, cancel: CancelToken, watcher: "_Watcher"):
        replicate = self._replicate or default_replicate()
        server, connector = ctx.server, ctx.connector
        server_id = server["server_id"]
        vm = json.loads(server["vm_record"])
        previous = self._previous_summary(ctx.job["job_id"])
        summary: dict[str, Any] = {"disks": []}
        with contextlib.ExitStack() as stack:
            previous_disks = _previous_disks(stack, connector["store"], previous)
            source = open_source(connector["source_kind"], json.loads(connector["source_config"]))
            stack.callback(source.close)
            snap = stack.enter_context(source.open_run(
                vm, previous=(previous or {}).get("source"), previous_disks=previous_disks,
                cancel=cancel))
            for w in snap.warnings:
                log.warning("%s: %s", server_id, w)
            self._adopt_move(ctx, snap.moved_to)
            total = sum(d.disk.size for d in snap.disks) or 1
            done_before = 0
            self._update_run(ctx.run["run_id"], stage="uploading", stage_progress="0%",
                             status_message=f"replicating {len(snap.disks)} disk(s), "
                                            f"{total} bytes")
            for i, sdisk in enumerate(snap.disks):
                watcher.check()

                def progress(done, _total, base=done_before):
                    watcher.progress("uploading", (base + done) / total)

                # only when known: injected replicate functions need not take the keyword
                changed = getattr(sdisk, "changed_extents", None)
                extra = {"changed_extents": changed} if changed is not None else {}
                result = replicate(sdisk.disk, connector["store"], disk_store_key(server_id, i),
                                   progress=progress, cancel=cancel,
                                   source=json.dumps({"vmId": vm.get("vmId"), "disk": sdisk.key}),
                                   **extra)
                done_before += sdisk.disk.size
                entry = result.to_dict()
                entry.update(key=sdisk.key, storeServerId=disk_store_key(server_id, i),
                             changeMethod=sdisk.change_method)
                summary["disks"].append(entry)
            summary["source"] = snap.record()
        summary["changeMethod"] = _change_method(summary["disks"])
        watcher.check()
        boot = summary["disks"][0]
        ami_id = None
        if self.image_step is not None:
            # what the image will be made from, before it exists: a connector killed
            # during registration finds the image again by it (recover_orphaned_runs)
            self._update_run(ctx.run["run_id"], store_run_id=boot["run_id"],
                             summary=json.dumps(summary), stage="converting", stage_progress="0%",
                             status_message="building and registering the image of the boot disk")
            ami_id = self.image_step.register(
                connector["store"], server_id, boot["run_id"],
                name=f"{server['vm_name']} {ctx.run['run_id']}",
                description=ctx.run["description"] or ctx.job["description"] or
                f"smsblock replication job {ctx.job['job_id']} run {ctx.run['run_id']}",
                license_type=ctx.job["license_type"],
                progress=lambda d, t: watcher.progress("converting", d / t if t else 1.0),
                cancel=cancel)
        changed = sum(d.get("blocks_changed", 0) for d in summary["disks"])
        stored = sum(d.get("bytes_stored", 0) for d in summary["disks"])
        message = (f"completed: {changed} blocks changed, {stored} bytes stored, "
                   f"{_METHOD_WORDS[summary['changeMethod']]}"
                   + (f", image {ami_id}" if ami_id else ", no image step available: blocks only"))
        if ami_id and "boot_test" in ctx.job.keys() and ctx.job["boot_test"]:
            message += "; " + self._boot_test(ctx, ami_id, summary, cancel)
        return ami_id, summary, message

    def _boot_test(self, ctx: RunContext, ami_id: str, summary: dict, cancel) -> str:
        """The job's bootTest: a failed boot test marks the image, never fails the run."""
        tester = getattr(self.image_step, "boot_test", None)
        if tester is None:
            summary["bootTest"] = {"ok": None, "message": "not available with this image step"}
            return "boot test not available with this image step"
        self._update_run(ctx.run["run_id"], status_message=f"boot-testing image {ami_id}")
        try:
            ok, text = tester(ami_id, cancel=cancel)
        except Cancelled:
            raise
        except SmsBlockError as e:
            ok, text = False, f"boot test could not run: {e}"
        summary["bootTest"] = {"ok": ok, "message": text}
        return text

    def _previous_summary(self, job_id: str) -> dict | None:
        """The record of the job's last completed run (its source's change ids, its disks)."""
        rows = self.state.query("SELECT summary FROM runs WHERE job_id = ? AND state = ? "
                                "ORDER BY completed DESC LIMIT 1",
                                (job_id, ReplicationRunState.COMPLETED.value))
        if not rows or rows[0]["summary"] is None:
            return None
        return json.loads(rows[0]["summary"])

    def _adopt_move(self, ctx: RunContext, moved_to: dict | None) -> None:
        """The source found the VM at a new place (vMotion, re-registration): the catalog
        follows it, so the next import and run look for it there."""
        if not moved_to:
            return
        server_id = ctx.server["server_id"]
        with self.state.transaction() as db:
            taken = db.execute("SELECT server_id FROM servers WHERE vm_manager_id = ? AND "
                               "vm_id = ? AND server_id != ?",
                               (moved_to["vmManagerId"], moved_to["vmId"], server_id)).fetchone()
            if taken is not None:    # a re-import already catalogued it under another id
                log.warning("%s: VM moved to %s, which the catalog knows as %s; not adopted",
                            server_id, moved_to["vmId"], taken["server_id"])
                return
            db.execute("UPDATE servers SET vm_id = ?, vm_manager_id = ?, vm_name = ?, "
                       "vm_path = ?, vm_record = ? WHERE server_id = ?",
                       (moved_to["vmId"], moved_to["vmManagerId"], moved_to["vmName"],
                        moved_to["vmPath"], json.dumps(moved_to), server_id))
        log.info("%s: the catalog follows the VM to %s (%s)", server_id, moved_to["vmId"],
                 moved_to["vmPath"])


class _Watcher:
    """Throttled progress writes, and cancellation when the job is deleted or the
    connector stops."""

    def __init__(self, executor: RunExecutor, ctx: RunContext, cancel: CancelToken):
        self.executor = executor
        self.ctx = ctx
        self.cancel = cancel
        self._last = 0.0
        self._lock = threading.Lock()

    def check(self) -> None:
        stop = self.executor.stop
        if stop is not None and stop.cancelled:
            self.cancel.cancel(f"the connector is stopping ({stop.reason})")
        else:
            rows = self.executor.state.query("SELECT state FROM jobs WHERE job_id = ?",
                                             (self.ctx.job["job_id"],))
            if rows and rows[0]["state"] in (ReplicationJobState.DELETING.value,
                                             ReplicationJobState.DELETED.value):
                self.cancel.cancel(_DELETED_CANCEL)
        self.cancel.check()

    def progress(self, stage: str, fraction: float) -> None:
        # called from engine worker threads; only one writes at a time, at most once a second
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL or not self._lock.acquire(blocking=False):
            return
        try:
            self._last = now
            pct = max(0, min(100, int(fraction * 100)))
            self.executor._update_run(self.ctx.run["run_id"], stage=stage,
                                      stage_progress=f"{pct}%")
            self.check()
        except Cancelled:
            pass   # the engine sees the token at its next check
        finally:
            self._lock.release()


_DELETED_CANCEL = "the replication job was deleted"

_METHOD_WORDS = {"cbt": "changes found by changed block tracking",
                 "hash": "changes found by the hashing diff",
                 "mixed": "changes found by changed block tracking and the hashing diff"}


def _change_method(disks: list[dict]) -> str:
    """"cbt", "hash" or "mixed": how the run's disks found what changed."""
    methods = {d.get("changeMethod") or "hash" for d in disks}
    return methods.pop() if len(methods) == 1 else "mixed"


def _previous_disks(stack: contextlib.ExitStack, store_url: str,
                    previous: dict | None) -> dict[str, Any]:
    """{disk key: the previous run's copy of it in the store}, for a source that reads only
    the areas changed block tracking reports and takes the rest from there.  Empty when
    the previous run had no change ids (nothing to ask CBT about); a disk whose blocks are
    gone (pruned) is left out, and the source reads it whole."""
    prev_source = {d.get("key"): d for d in ((previous or {}).get("source") or {}).get("disks", [])}
    disks = [d for d in (previous or {}).get("disks", [])
             if (prev_source.get(d.get("key")) or {}).get("changeId")]
    if not disks:
        return {}
    from ..store import open_store
    store = open_store(store_url)
    stack.callback(store.close)
    out = {}
    for d in disks:
        try:
            disk = store.run_disk(d["storeServerId"], d["run_id"])
        except (SmsBlockError, OSError) as e:
            log.warning("previous run of %s unreadable (%s): reading the disk whole",
                        d.get("storeServerId"), e)
            continue
        stack.callback(disk.close)
        out[d["key"]] = disk
    return out
