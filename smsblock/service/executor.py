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

Every state change is one transaction of the control plane, made through a
``control_plane`` (:mod:`smsblock.service.controlplane`): the state in this process, or
a remote ``smsblock serve`` over HTTP(S).  A run is executed under a claim (a lease and a
fence, :mod:`smsblock.service.fleet`): every report, completion or failure names the
claim, and one the run was taken away from (its lease ran out and another connector
claimed it) is refused; the run then stops and :meth:`RunExecutor.execute` answers
``LOST``, recording nothing.  A process killed while a run is ACTIVE leaves it ACTIVE;
another connector of the same vm manager resumes it once its lease runs out, and in
local mode :meth:`RunExecutor.recover_orphaned_runs` (called when the connector comes
back) marks it FAILED with the reason (DELETED if its job was deleted); the next run
resumes from the blocks already stored.  Before the image step starts, the run records
the stored run the image is made from, so a process killed between registering the
image and recording the run leaves a run that the restart completes with that image
instead of an image nothing points to.

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

from ..errors import Cancelled, ConnectorError, ImageNotFoundError, ServiceError, SmsBlockError
from ..progress import CancelToken
from . import fleet
from .controlplane import LocalControlPlane, is_stale
from .fleet import Fleet, stale
from .jobs import record_run_failure
from .models import MAX_FAILURE_REASON, ReplicationRunState, bounded_message
from .sources import one_line, open_source
from .state import ServiceConfig, State

log = logging.getLogger(__name__)

#: how often (seconds) progress is written to the state database and cancellation polled
PROGRESS_INTERVAL = 1.0
#: what :meth:`RunExecutor.execute` returns for a run reassigned while it executed
LOST = "LOST"


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
    """A claimed run: the records it is executed from (dicts), the connector's source
    and store, and the claim (``fence``, the connector holding it)."""

    run: Any
    job: Any
    server: Any
    connector: Any           # {"store", "source_kind", "source_config"}
    claim: dict
    cancel: CancelToken | None = None
    lost: str | None = None  # why the claim was lost (reassigned), when it was


DELETED_MESSAGE = fleet.DELETED_MESSAGE
job_deleted = fleet.job_deleted
_end_deleted = fleet.end_deleted


def fail_orphaned_runs(state: State, connector_id: str, now: float,
                       config: ServiceConfig | None = None) -> list[str]:
    """Mark FAILED every run left ACTIVE by a dead process of this connector (DELETED
    when its job was deleted meanwhile): the runs it claimed, and those of its servers
    claimed before claims were recorded.

    Call only while holding the connector's process lock: then no live process of this
    connector can own an ACTIVE run.
    """
    config = config or ServiceConfig.load(state.dir)
    with state.transaction() as db:
        rows = db.execute(
            "SELECT r.run_id, r.job_id FROM runs r JOIN jobs j ON j.job_id = r.job_id "
            "JOIN servers s ON s.server_id = j.server_id "
            "WHERE r.state = ? AND (r.claimed_by = ? OR "
            "(r.claimed_by IS NULL AND s.connector_id = ?))",
            (ReplicationRunState.ACTIVE.value, connector_id, connector_id)).fetchall()
        for r in rows:
            if job_deleted(db, r["job_id"]):
                _end_deleted(db, r["run_id"], now, " (the connector had stopped)")
                continue
            reason = ("the connector stopped while the run was active (killed or crashed); "
                      "the next run resumes from the blocks already stored")
            db.execute("UPDATE runs SET state = ?, status_message = ?, completed = ?, "
                       "lease_until = NULL WHERE run_id = ?",
                       (ReplicationRunState.FAILED.value, f"FAILED: {reason}", now, r["run_id"]))
            record_run_failure(db, r["job_id"], r["run_id"], reason, config)
    return [r["run_id"] for r in rows]


class RunExecutor:
    """Executes runs of one connector; ``replicate`` and ``image_step`` are injectable.

    ``control_plane`` is what the runs are claimed from and reported to: by default the
    state in this process (:class:`~.controlplane.LocalControlPlane`); a remote
    connector passes a :class:`~.controlplane.RemoteControlPlane` (``state`` None)."""

    def __init__(self, state: State | None, clock: Callable[[], float], *,
                 replicate: Callable | None = None, image_step: ImageStep | None = None,
                 use_default_image_step: bool = True, stop: CancelToken | None = None,
                 config: ServiceConfig | None = None, control_plane=None):
        self.state = state
        self.clock = clock
        if control_plane is None:
            self.config = config or ServiceConfig.load(state.dir)
            control_plane = LocalControlPlane(Fleet(state, clock, self.config))
        else:
            self.config = config
        self.cp = control_plane
        self._replicate = replicate
        self.image_step = image_step
        if image_step is None and use_default_image_step and state is not None:
            self.image_step = default_image_step(state.dir)
        self.stop = stop
        #: the run being executed now ({run_id: RunContext}); the connector's heartbeat
        #: renews their leases and learns of the ones it lost
        self.held: dict[str, RunContext] = {}
        #: what the last :meth:`execute` did (for the connector's log)
        self.last: dict | None = None

    # --- state changes (each one transaction of the control plane) -----------------

    def update_run(self, ctx: RunContext, **cols) -> None:
        cancel = self.cp.report(ctx.claim, **cols)
        if cancel and ctx.cancel is not None:
            ctx.cancel.cancel(cancel)

    def _claim(self, run_id: str) -> RunContext | None:
        """PENDING (or ACTIVE with its lease run out) → ACTIVE, claimed by this
        connector; None when the run is not claimable (deleted, taken, ended)."""
        claim = self.cp.claim(run_id)
        if claim is None:
            return None
        return RunContext(claim["run"], claim["job"], claim["server"],
                          {"store": claim["store"], "source_kind": claim["sourceKind"],
                           "source_config": claim["sourceConfig"]}, claim)

    def lost(self, run_id: str, reason: str) -> None:
        """The control plane says this connector no longer holds ``run_id``: stop it."""
        ctx = self.held.get(run_id)
        if ctx is not None:
            ctx.lost = reason
            if ctx.cancel is not None:
                ctx.cancel.cancel(reason)

    def _fail(self, ctx: RunContext, reason: str) -> str:
        """The run ends FAILED, or DELETED when its job was deleted; returns the state."""
        # the reason may quote .vmx content or paths: statusMessage stays short
        reason = bounded_message(reason, MAX_FAILURE_REASON)
        return self.cp.fail(ctx.claim, reason, _DELETED_CANCEL in reason)

    def _complete(self, ctx: RunContext, ami_id: str | None, summary: dict, message: str) -> str:
        """Record the run COMPLETED with its image, or - when the job was deleted - end it
        DELETED and deregister the image it made; returns the run's state."""
        # the control plane reads the job's state in the transaction that records the
        # image: a deletion committed before it means no image, one after it finds the
        # image recorded
        answer = self.cp.complete(ctx.claim, ami_id, summary, message)
        if answer.get("orphan"):
            # the run stays ACTIVE until the image is gone: a crash in between is settled
            # by recover_orphaned_runs, which finds the image and comes back here
            return self._drop_image_of_deleted_job(ctx, answer["orphan"])
        done = []
        for ami in answer.get("deregister") or []:   # outside the transaction: may be slow
            try:
                self.image_step.deregister(ami)
            except ImageNotFoundError:
                pass   # already gone (deleted by hand): record it as deregistered
            except SmsBlockError as e:   # tried again when the next image is registered
                log.warning("could not deregister old image %s of job %s: %s", ami,
                            ctx.job["job_id"], e)
                continue
            done.append(ami)
        if done:
            self.cp.images_deregistered(ctx.claim, done)
        return answer["state"]

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
        return self.cp.end_deleted(ctx.claim, detail)

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
            "JOIN servers s ON s.server_id = j.server_id WHERE r.claimed_by = ? "
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
        """The context of a run this connector holds already (local state only)."""
        with self.state.transaction() as db:
            run = dict(db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone())
            job = dict(db.execute("SELECT * FROM jobs WHERE job_id = ?",
                                  (run["job_id"],)).fetchone())
            server = dict(db.execute("SELECT * FROM servers WHERE server_id = ?",
                                     (job["server_id"],)).fetchone())
            connector = dict(db.execute("SELECT * FROM connectors WHERE connector_id = ?",
                                        (server["connector_id"],)).fetchone())
        claim = {"run": run, "fence": run["fence"], "claimedBy": run["claimed_by"]}
        return RunContext(run, job, server, connector, claim)

    # --- one run --------------------------------------------------------------------

    def execute(self, run_id: str) -> str | None:
        """Run ``run_id`` if this connector can claim it (PENDING, or ACTIVE with its lease
        run out: then it resumes); return its final state (None if not run, ``LOST``
        when the run was reassigned meanwhile: nothing of it was recorded)."""
        ctx = self._claim(run_id)
        self.last = None
        if ctx is None:
            return None
        ctx.cancel = cancel = CancelToken()
        self.held[run_id] = ctx
        self.last = {"run_id": run_id, "job_id": ctx.job["job_id"],
                     "server_id": ctx.server["server_id"], "type": ctx.run["type"],
                     "resumed": bool(ctx.claim.get("resumed")), "fence": ctx.claim["fence"]}
        try:
            state = self._execute(ctx, cancel)
        except ServiceError as e:
            if not is_stale(e):
                raise
            ctx.lost = str(e)
            state = LOST
        finally:
            self.held.pop(run_id, None)
        if state == LOST:
            log.warning("run %s: %s", run_id, ctx.lost)
        self.last["state"] = state
        return state

    def _execute(self, ctx: RunContext, cancel: CancelToken) -> str:
        run_id = ctx.run["run_id"]
        watcher = _Watcher(self, ctx, cancel)
        try:
            ami_id, summary, message = self._work(ctx, cancel, watcher)
        except Cancelled as e:
            if ctx.lost:
                return LOST
            return self._fail(ctx, f"cancelled: {e}")
        except ServiceError as e:
            if is_stale(e):
                raise
            log.warning("run %s failed: %s", run_id, e)
            return self._fail(ctx, one_line(e))
        except (SmsBlockError, OSError) as e:
            log.warning("run %s failed: %s", run_id, e)
            return self._fail(ctx, one_line(e))
        except Exception as e:   # a bug must not leave the run ACTIVE forever
            log.exception("run %s failed unexpectedly", run_id)
            return self._fail(ctx, f"internal error: {type(e).__name__}: {one_line(e)}")
        if ctx.lost:
            raise stale(ctx.lost)
        return self._complete(ctx, ami_id, summary, message)

    def _work(self, ctx: RunContext, cancel: CancelToken, watcher: "_Watcher"):
        replicate = self._replicate or default_replicate()
        server, connector = ctx.server, ctx.connector
        server_id = server["server_id"]
        vm = json.loads(server["vm_record"])
        previous = ctx.claim.get("previous")
        summary: dict[str, Any] = {"disks": []}
        with contextlib.ExitStack() as stack:
            previous_disks = _previous_disks(stack, connector["store"], previous)
            config = connector["source_config"]
            source = open_source(connector["source_kind"],
                                 json.loads(config) if isinstance(config, str) else config)
            stack.callback(source.close)
            snap = stack.enter_context(source.open_run(
                vm, previous=(previous or {}).get("source"), previous_disks=previous_disks,
                cancel=cancel))
            for w in snap.warnings:
                log.warning("%s: %s", server_id, w)
            self._adopt_move(ctx, snap.moved_to)
            total = sum(d.disk.size for d in snap.disks) or 1
            done_before = 0
            self.update_run(ctx, stage="uploading", stage_progress="0%",
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
            self.update_run(ctx, store_run_id=boot["run_id"],
                             summary=summary, stage="converting", stage_progress="0%",
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
        self.update_run(ctx, status_message=f"boot-testing image {ami_id}")
        try:
            ok, text = tester(ami_id, cancel=cancel)
        except Cancelled:
            raise
        except SmsBlockError as e:
            ok, text = False, f"boot test could not run: {e}"
        summary["bootTest"] = {"ok": ok, "message": text}
        return text

    def _adopt_move(self, ctx: RunContext, moved_to: dict | None) -> None:
        """The source found the VM at a new place (vMotion, re-registration): the catalog
        follows it, so the next import and run look for it there."""
        if moved_to:
            self.update_run(ctx, moved_to=moved_to)


class _Watcher:
    """Throttled progress writes, and cancellation when the job is deleted or the
    connector stops."""

    def __init__(self, executor: RunExecutor, ctx: RunContext, cancel: CancelToken):
        self.executor = executor
        self.ctx = ctx
        self.cancel = cancel
        self._last = 0.0
        self._lock = threading.Lock()

    def _stopping(self) -> None:
        stop = self.executor.stop
        if stop is not None and stop.cancelled:
            self.cancel.cancel(f"the connector is stopping ({stop.reason})")

    def check(self) -> None:
        """Stop if the connector stops, the job is deleted or the run was reassigned (the
        control plane answers the last two to a report, which also renews the lease)."""
        self._stopping()
        if not self.cancel.cancelled:
            self.executor.update_run(self.ctx)
        self.cancel.check()

    def progress(self, stage: str, fraction: float) -> None:
        # called from engine worker threads; only one writes at a time, at most once a second
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL or not self._lock.acquire(blocking=False):
            return
        try:
            self._last = now
            pct = max(0, min(100, int(fraction * 100)))
            self._stopping()
            self.executor.update_run(self.ctx, stage=stage, stage_progress=f"{pct}%")
        except ServiceError as e:
            if not is_stale(e):
                raise
            self.executor.lost(self.ctx.run["run_id"], str(e))   # the engine stops
        except ConnectorError as e:     # the control plane briefly unreachable: go on
            log.warning("run %s: progress not reported: %s", self.ctx.run["run_id"], e)
        finally:
            self._lock.release()


_DELETED_CANCEL = fleet.DELETED_CANCEL

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
