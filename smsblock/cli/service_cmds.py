"""``smsblock connector ...``, ``smsblock sms VERB ...`` and ``smsblock serve``.

``smsblock sms`` takes the verbs, options and JSON output of ``aws sms`` (AWS CLI v1):
empty responses print nothing, errors print ``An error occurred (Code) when calling the
Op operation: message`` and exit 255.  Timestamps are accepted as ISO 8601 or epoch
seconds and printed as epoch seconds, as the SMS wire protocol carries them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time

from ..errors import ServiceError, UsageError
from . import print_json

log = logging.getLogger(__name__)

EXIT_SERVICE_ERROR = 255   # what aws (v1) exits with on a service error


def _add_state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", metavar="DIR|URL", default=None,
                   help="state directory (default: $SMSBLOCK_HOME or ~/.smsblock), or a "
                        "PostgreSQL database postgresql://USER@HOST:PORT/DB (its local "
                        "files then go to $SMSBLOCK_HOME or ~/.smsblock)")


def _service(args):
    from ..service import SmsService
    return SmsService(args.state)


def _print_json(doc) -> None:
    """The AWS responses as AWS shapes them (no ``schema`` key), in the CLI's one style;
    an empty response prints nothing, as ``aws sms`` does."""
    if doc != {}:
        print_json(doc, schema=False)


class _EventLog:
    """What ``connector run`` does, one line each on stderr: a connector is a daemon, and
    its operator should see runs start, finish and fail without asking for -v."""

    def __init__(self, loop, stream=None):
        self.loop, self.stream = loop, stream or sys.stderr
        self.svc = loop.service
        executor = loop.executor
        execute, recover = executor.execute, executor.recover_orphaned_runs
        tick, deletions = self.svc.tick, loop.finish_deletions

        def logged_execute(run_id):
            run = self._run(run_id)
            if run is not None and run["state"] == "PENDING":
                self.say(f"run {run_id} started (job {run['job_id']}, server {run['server_id']}, "
                         f"{run['type']})")
            outcome = execute(run_id)
            if outcome is not None:
                run = self._run(run_id) or {}
                detail = run.get("ami_id") or run.get("status_message") or ""
                verb = {"COMPLETED": "finished", "FAILED": "failed",
                        "DELETED": "ended (job deleted)"}.get(outcome, f"ended {outcome}")
                self.say(f"run {run_id} {verb}" + (f": {detail}" if detail else ""))
            return outcome

        def logged_recover(connector_id):
            ids = recover(connector_id)
            for run_id in ids:
                run = self._run(run_id) or {}
                self.say(f"run {run_id} left by a stopped connector: {run.get('state', '?')}"
                         + (f" ({run['status_message']})" if run.get("status_message") else ""))
            return ids

        def logged_tick():
            ids = tick()
            for run_id in ids:
                run = self._run(run_id) or {}
                self.say(f"run {run_id} scheduled (job {run.get('job_id')}, {run.get('type')})")
            return ids

        def logged_deletions():
            ids = deletions()
            for job_id in ids:
                self.say(f"job {job_id} deleted: its blocks were removed from the store")
            return ids

        executor.execute, executor.recover_orphaned_runs = logged_execute, logged_recover
        self.svc.tick, loop.finish_deletions = logged_tick, logged_deletions

    def _run(self, run_id):
        rows = self.svc.state.query(
            "SELECT r.run_id, r.job_id, r.type, r.state, r.status_message, r.ami_id, j.server_id "
            "FROM runs r JOIN jobs j ON j.job_id = r.job_id WHERE r.run_id = ?", (run_id,))
        return dict(rows[0]) if rows else None

    def say(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"{stamp} connector {self.loop.connector_id}: {text}", file=self.stream, flush=True)

    def catalog(self) -> None:
        rows = self.svc.state.query("SELECT status, last_modified_on FROM catalog WHERE id = 1")
        servers = self.svc.state.query("SELECT COUNT(*) FROM servers WHERE in_catalog = 1")[0][0]
        status = rows[0]["status"] if rows else "NOT_IMPORTED"
        hint = ("; import it with `smsblock sms import-server-catalog`"
                if status == "NOT_IMPORTED" else "")
        self.say(f"server catalog {status}, {servers} servers{hint}")


# --- smsblock connector ----------------------------------------------------------------

MAX_SOURCE_CONFIG = 1 << 20    # bytes of --source-config (a JSON object, not data)


def _source_config(text: str | None) -> dict:
    """``--source-config``: a JSON object, inline or ``@FILE`` (a regular file, bounded)."""
    if text is None:
        return {}
    where = "--source-config"
    if text.startswith("@"):
        from ..fsutil import read_small_file
        where = text[1:]
        try:
            raw = read_small_file(where, MAX_SOURCE_CONFIG)
        except OSError as e:
            raise UsageError(f"--source-config {where}: {e.strerror}") from None
        text = raw.decode("utf-8", errors="replace")
    try:
        config = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{where}: bad JSON: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{where}: the source config must be a JSON object")
    return config


def _connector_register(args) -> int:
    chosen = [o for o, v in (("--datastore", args.datastore), ("--vcenter", args.vcenter),
                             ("--source-kind", args.source_kind)) if v]
    if len(chosen) != 1:
        raise UsageError("connector register: give exactly one of --datastore PATH, "
                         "--vcenter HOST or --source-kind KIND")
    if args.source_config is not None and not args.source_kind:
        raise UsageError("--source-config is only valid with --source-kind")
    from ..source.vsphere import settings_from_args
    if args.datastore:
        from ..service.sources import DatastoreSource
        settings_from_args(args)    # refuses vCenter options without --vcenter
        kind, config = "datastore", DatastoreSource(args.datastore).config()  # absolute, checked
    elif args.vcenter:
        kind, config = "vsphere", settings_from_args(args).to_config()
    else:
        settings_from_args(args)
        kind, config = args.source_kind, _source_config(args.source_config)
    with _service(args) as svc:
        connector = svc.register_connector(kind, config, store=args.store)
    _print_json(connector)
    return 0


def _connector_run(args) -> int:
    from ..service.connector import ConnectorLoop
    with _service(args) as svc:
        loop = ConnectorLoop(svc, args.connector_id, heartbeat_interval=args.heartbeat_interval)
        events = _EventLog(loop)
        with loop:
            events.catalog()
            if args.once:
                done = loop.run_once()
                if not any(done.values()):
                    events.say("nothing due")
                print_json(done)
                return 0
            events.say(f"running; polling every {args.poll_interval:g} s (Ctrl-C stops)")
            previous = signal.signal(signal.SIGTERM, lambda *_: loop.stop.cancel("SIGTERM"))
            try:
                loop.run_forever(args.poll_interval)
            except KeyboardInterrupt:
                loop.stop.cancel("interrupted")
            finally:
                signal.signal(signal.SIGTERM, previous)
            events.say(f"stopped ({loop.stop.reason})")
    return 0


# --- smsblock sms VERB ------------------------------------------------------------------

def _shorthand_addresses(text: str) -> list[dict]:
    """``--vm-server-address-list``: JSON, or aws shorthand ``vmManagerId=a,vmId=b ...``."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--vm-server-address-list: bad JSON: {e}") from None
        return value
    out = []
    for item in text.split():
        entry = {}
        for pair in item.split(","):
            key, sep, value = pair.partition("=")
            if not sep or key not in ("vmManagerId", "vmId"):
                raise UsageError(f"--vm-server-address-list: expected vmManagerId=...,vmId=..., "
                                 f"got {pair!r}")
            entry[key] = value
        out.append(entry)
    return out


def _paging(p):
    p.add_argument("--max-results", dest="maxResults", type=int)
    p.add_argument("--next-token", dest="nextToken")


def _job_settings(p, create: bool):
    p.add_argument("--frequency", type=int, help="hours between runs (12 to 24)")
    if create:
        p.add_argument("--run-once", dest="runOnce", action=argparse.BooleanOptionalAction)
    p.add_argument("--license-type", dest="licenseType", choices=["AWS", "BYOL"])
    p.add_argument("--role-name", dest="roleName")
    p.add_argument("--description")
    p.add_argument("--number-of-recent-amis-to-keep", dest="numberOfRecentAmisToKeep", type=int)
    p.add_argument("--encrypted", action=argparse.BooleanOptionalAction)
    p.add_argument("--kms-key-id", dest="kmsKeyId")
    p.add_argument("--boot-test", dest="bootTest", action=argparse.BooleanOptionalAction,
                   help="boot-test each new image under QEMU (smsblock's own job field)")


def _verbs():
    """(verb, operation, add-options function)."""

    def none(p):
        pass

    def connector_id(p):
        p.add_argument("--connector-id", dest="connectorId", required=True)

    def get_servers(p):
        _paging(p)
        p.add_argument("--vm-server-address-list", dest="vmServerAddressList",
                       metavar="vmManagerId=ID,vmId=ID ... | JSON")

    def create_job(p):
        p.add_argument("--server-id", dest="serverId", required=True)
        p.add_argument("--seed-replication-time", dest="seedReplicationTime", required=True,
                       help="ISO 8601 or epoch seconds")
        _job_settings(p, create=True)

    def get_jobs(p):
        p.add_argument("--replication-job-id", dest="replicationJobId")
        _paging(p)

    def get_runs(p):
        p.add_argument("--replication-job-id", dest="replicationJobId", required=True)
        _paging(p)

    def update_job(p):
        p.add_argument("--replication-job-id", dest="replicationJobId", required=True)
        p.add_argument("--next-replication-run-start-time", dest="nextReplicationRunStartTime",
                       help="ISO 8601 or epoch seconds")
        _job_settings(p, create=False)

    def on_demand(p):
        p.add_argument("--replication-job-id", dest="replicationJobId", required=True)
        p.add_argument("--description")

    def job_id(p):
        p.add_argument("--replication-job-id", dest="replicationJobId", required=True)

    return [
        ("get-connectors", "GetConnectors", _paging),
        ("disassociate-connector", "DisassociateConnector", connector_id),
        ("import-server-catalog", "ImportServerCatalog", none),
        ("delete-server-catalog", "DeleteServerCatalog", none),
        ("get-servers", "GetServers", get_servers),
        ("create-replication-job", "CreateReplicationJob", create_job),
        ("get-replication-jobs", "GetReplicationJobs", get_jobs),
        ("get-replication-runs", "GetReplicationRuns", get_runs),
        ("update-replication-job", "UpdateReplicationJob", update_job),
        ("start-on-demand-replication-run", "StartOnDemandReplicationRun", on_demand),
        ("delete-replication-job", "DeleteReplicationJob", job_id),
    ]


def _sms(args) -> int:
    from ..service.api import OPERATIONS
    params = {k: v for k, v in vars(args).items()
              if k in OPERATIONS[args.operation] and v is not None}
    if "vmServerAddressList" in params:
        params["vmServerAddressList"] = _shorthand_addresses(params["vmServerAddressList"])
    with _service(args) as svc:
        try:
            result = svc.call(args.operation, params)
        except ServiceError as e:
            print(f"\nAn error occurred ({e.code}) when calling the {args.operation} "
                  f"operation: {e}", file=sys.stderr)
            return EXIT_SERVICE_ERROR
    _print_json(result)
    return 0


# --- smsblock serve -----------------------------------------------------------------------

def _interrupt(*_):
    raise KeyboardInterrupt   # SIGTERM stops serve_forever like Ctrl-C


def _serve(args) -> int:
    from ..service.server import make_server
    with _service(args) as svc:
        server = make_server(svc, args.host, args.port, region=args.region)
        print(f"smsblock serve: listening on {server.url} (state {svc.state.location}, "
              f"region {args.region})", flush=True)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            server.server_close()
    return 0



def _port(text: str) -> int:
    """A TCP port number, 0 to 65535 (argparse type)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range 0-65535")
    return port


def _region(text: str) -> str:
    """An AWS region name such as us-east-1 (argparse type)."""
    from ..service.server import REGION
    if not REGION.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a region name: {text[:64]!r}")
    return text


def register(subparsers) -> None:
    conn = subparsers.add_parser("connector", help="register and run a connector")
    conn_sub = conn.add_subparsers(dest="connector_command", metavar="ACTION", required=True)

    reg = conn_sub.add_parser("register", help="associate a new connector; prints it as JSON")
    _add_state(reg)
    reg.add_argument("--datastore", metavar="PATH", help="datastore folder of VM folders (.vmx + VMDKs)")
    # the vCenter options (read by smsblock.source.vsphere.settings_from_args)
    reg.add_argument("--vcenter", metavar="HOST[:PORT]|URL",
                     help="vCenter to register with (https:// by default; http:// for simulators)")
    reg.add_argument("--username", help="vCenter service account")
    reg.add_argument("--password-file", metavar="FILE",
                     help="file whose first line is the vCenter password "
                          "(default: $SMSBLOCK_VCENTER_PASSWORD)")
    reg.add_argument("--ca-bundle", metavar="FILE",
                     help="PEM CA certificate(s) that signed vCenter's certificate")
    reg.add_argument("--insecure", action="store_true",
                     help="ignore hostname mismatch and expiration errors for vCenter and "
                          "ESXi certificates (the chain is still verified)")
    reg.add_argument("--source-kind", metavar="KIND",
                     help="another source kind: one a plugin declares (entry point group "
                          "smsblock.sources)")
    reg.add_argument("--source-config", metavar="JSON|@FILE",
                     help="the --source-kind's config, a JSON object (default {}); "
                          "stored in the state: no secrets")
    reg.add_argument("--store", metavar="PATH_OR_URL",
                     help="block store for this connector's runs (default: STATE/store)")
    reg.set_defaults(func=_connector_register)

    run = conn_sub.add_parser("run", help="heartbeat, schedule and execute due runs")
    _add_state(run)
    run.add_argument("--connector-id", help="which connector (default: the only one)")
    run.add_argument("--once", action="store_true", help="do what is due now, print it, exit")
    run.add_argument("--poll-interval", type=float, default=10.0, metavar="SECONDS")
    run.add_argument("--heartbeat-interval", type=float, default=30.0, metavar="SECONDS")
    run.set_defaults(func=_connector_run)

    sms = subparsers.add_parser("sms", help="the SMS API verbs of `aws sms`, on local state")
    sms_sub = sms.add_subparsers(dest="sms_verb", metavar="VERB", required=True)
    for verb, operation, add_options in _verbs():
        p = sms_sub.add_parser(verb, help=operation)
        _add_state(p)
        add_options(p)
        p.set_defaults(func=_sms, operation=operation)

    serve = subparsers.add_parser("serve", help="serve the SMS JSON API over HTTP (SigV4-checked)")
    _add_state(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8080, help="0 picks a free port")
    serve.add_argument("--region", type=_region, default="us-east-1",
                       help="region the clients sign for (their --region); default us-east-1")
    serve.set_defaults(func=_serve)
