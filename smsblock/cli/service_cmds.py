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


def _source_of(args) -> tuple[str, dict]:
    """The source kind and config ``connector register``'s options name."""
    chosen = [o for o, v in (("--datastore", args.datastore), ("--vcenter", args.vcenter),
                             ("--source-kind", args.source_kind)) if v]
    if len(chosen) != 1:
        raise UsageError("connector register: give exactly one of --datastore PATH, "
                         "--vcenter HOST or --source-kind KIND")
    if args.source_config is not None and not args.source_kind:
        raise UsageError("--source-config is only valid with --source-kind")
    from ..source.vsphere import settings_from_args
    if args.endpoint and not args.vcenter:
        # --ca-bundle/--insecure are the endpoint's then, not a vCenter's
        args = argparse.Namespace(**{**vars(args), "ca_bundle": None, "insecure": False})
    if args.datastore:
        from ..service.sources import DatastoreSource
        settings_from_args(args)    # refuses vCenter options without --vcenter
        return "datastore", DatastoreSource(args.datastore).config()  # absolute, checked
    if args.vcenter:
        return "vsphere", settings_from_args(args).to_config()
    settings_from_args(args)
    return args.source_kind, _source_config(args.source_config)


def _connector_register(args) -> int:
    if args.endpoint:
        return _remote_register(args)
    for opt in ("access_key_id", "secret_access_key", "secret_access_key_file",
                "credentials_file", "connector_dir"):
        if getattr(args, opt, None):
            raise UsageError(f"--{opt.replace('_', '-')} is only valid with --endpoint")
    kind, config = _source_of(args)
    with _service(args) as svc:
        connector = svc.register_connector(kind, config, store=args.store)
    _print_json(connector)
    return 0


def _connector_run(args) -> int:
    from ..service.connector import ConnectorLoop
    # $SMSBLOCK_CONNECTOR_HOME stands for --connector-dir unless --state names a local one
    connector_dir = _connector_dir(args) if args.connector_dir or args.state is None else None
    if connector_dir is not None:
        if args.state is not None or args.connector_id is not None:
            raise UsageError("--connector-dir runs a remote connector: --state and "
                             "--connector-id are for a local one")
        return _remote_run(args, connector_dir)
    with _service(args) as svc:
        loop = ConnectorLoop(svc, args.connector_id, heartbeat_interval=args.heartbeat_interval)
        events = _EventLog(loop)
        with loop:
            events.catalog()
            return _drive(args, loop, events)


def _drive(args, loop, events) -> int:
    """``--once``: one pass, printed; else passes until Ctrl-C or SIGTERM."""
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


# --- remote connectors (docs/fleet.md) ------------------------------------------------------

CONNECTOR_FILE = "connector.json"
CONNECTOR_HOME_ENV = "SMSBLOCK_CONNECTOR_HOME"
MAX_CREDENTIALS_FILE = 64 * 1024


def _connector_dir(args):
    from pathlib import Path
    import os
    if getattr(args, "connector_dir", None):
        return Path(args.connector_dir).absolute()
    env = os.environ.get(CONNECTOR_HOME_ENV)
    return Path(env).absolute() if env else None


def _remote_credentials(args) -> tuple[str, str]:
    """The connector's key pair: flags, else --credentials-file (the JSON `connector
    credential create` prints), else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""
    import os
    from ..fsutil import first_line, read_small_file
    akid, secret = args.access_key_id, args.secret_access_key
    if args.secret_access_key_file:
        try:
            raw = read_small_file(args.secret_access_key_file, MAX_CREDENTIALS_FILE)
        except OSError as e:
            raise UsageError(f"--secret-access-key-file {args.secret_access_key_file}: "
                             f"{e.strerror}") from None
        secret = first_line(raw, MAX_CREDENTIALS_FILE).decode("utf-8", "replace").strip()
    if args.credentials_file:
        if akid or secret:
            raise UsageError("give the key pair once: --credentials-file or the key flags")
        where = args.credentials_file
        try:
            doc = json.loads(read_small_file(where, MAX_CREDENTIALS_FILE))
            akid, secret = doc["accessKeyId"], doc["secretAccessKey"]
        except OSError as e:
            raise UsageError(f"--credentials-file {where}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"--credentials-file {where}: not the JSON `smsblock connector "
                             "credential create` prints (accessKeyId, secretAccessKey)") from None
    if not akid and not secret:
        akid, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not akid or not secret:
        raise UsageError("connector register --endpoint needs the connector's key pair: "
                         "--access-key-id with --secret-access-key(-file), --credentials-file, "
                         "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if not isinstance(akid, str) or not isinstance(secret, str):
        raise UsageError("the access key id and secret must be text")
    return akid, secret


def _remote_register(args) -> int:
    """Register with a remote `smsblock serve`; the connector's settings (secret
    included) go to CONNECTOR_DIR/connector.json, owner-only."""
    from ..fsutil import make_root, replace_file, subdir
    from ..service.controlplane import RemoteControlPlane, source_identity
    from ..service.sources import open_source
    from ..store import open_store
    if args.state is not None:
        raise UsageError("--endpoint registers with a remote control plane: --state is for "
                         "a local one")
    connector_dir = _connector_dir(args)
    if connector_dir is None:
        from pathlib import Path
        connector_dir = Path.home() / ".smsblock-connector"
    if args.ca_bundle and args.insecure and not args.vcenter:
        raise UsageError("--ca-bundle and --insecure contradict each other")
    if args.store:
        raise UsageError("--store: a remote connector's store is named by the control plane "
                         "(smsblock connector credential create --store)")
    kind, config = _source_of(args)
    akid, secret = _remote_credentials(args)
    ca_bundle = str(_abspath(args.ca_bundle)) if args.ca_bundle else None
    cp = RemoteControlPlane(args.endpoint, akid, secret, "", region=args.region,
                            ca_bundle=ca_bundle, insecure=args.insecure,
                            source_kind=kind, source_config=config)
    source = open_source(kind, config)     # refuses an unreachable or malformed source
    try:
        identity = source_identity(source)
    finally:
        source.close()
    from ..service.api import _local_ip, _local_mac
    answer = cp.call("RegisterConnector", sourceKind=kind, vmManagerName=identity["manager_name"],
                     vmManagerType=identity["manager_type"], vmManagerId=identity["manager_id"],
                     ipAddress=_local_ip(), macAddress=_local_mac())
    store = answer["store"]
    # the control plane names the store; the connector creates it (it holds the store's
    # own credentials: AWS_* or SMSBLOCK_S3_* for S3)
    open_store(store).initialise()
    settings = {"endpoint": cp.endpoint, "connectorId": answer["connector"]["connectorId"],
                "accessKeyId": akid, "secretAccessKey": secret, "region": args.region,
                "caBundle": ca_bundle, "insecure": bool(args.insecure),
                "sourceKind": kind, "sourceConfig": config, "store": store}
    try:
        make_root(connector_dir)
        with subdir(connector_dir) as fd:
            replace_file(CONNECTOR_FILE, json.dumps(settings, indent=2).encode(), dir_fd=fd)
    except OSError as e:
        raise UsageError(f"connector folder {connector_dir}: {e.strerror}") from None
    _print_json(dict(answer["connector"], store=store, connectorDir=str(connector_dir)))
    return 0


def _abspath(path):
    from pathlib import Path
    return Path(path).absolute()


def _remote_settings(connector_dir) -> dict:
    from ..fsutil import read_small_file
    path = connector_dir / CONNECTOR_FILE
    try:
        doc = json.loads(read_small_file(path, 4 * MAX_SOURCE_CONFIG))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; register first: smsblock connector register "
                         f"--endpoint URL --connector-dir {connector_dir} ...") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"{path}: bad JSON: {e}") from None
    need = ("endpoint", "connectorId", "accessKeyId", "secretAccessKey", "sourceKind",
            "sourceConfig")
    if not isinstance(doc, dict) or any(k not in doc for k in need):
        raise UsageError(f"{path}: not a connector's settings (needs {', '.join(need)})")
    return doc


class _RemoteEventLog:
    """What a remote ``connector run`` does, one line each on stderr."""

    def __init__(self, loop, stream=None):
        self.loop, self.stream = loop, stream or sys.stderr
        executor = loop.executor
        execute, upload, claim = executor.execute, loop.upload_catalog, executor.cp.claim

        def logged_claim(run_id):
            got = claim(run_id)
            if got is not None:
                resumed = f", resuming it: claim {got['fence']}" if got.get("resumed") else ""
                self.say(f"run {run_id} started (job {got['job']['job_id']}, server "
                         f"{got['server']['server_id']}, {got['run']['type']}{resumed})")
            return got

        def logged_execute(run_id):
            outcome = execute(run_id)
            last = executor.last or {}
            if outcome is None:
                return outcome
            how = (f" (resumed: claim {last.get('fence')}, after the connector holding it "
                   "stopped)") if last.get("resumed") else ""
            if outcome == "LOST":
                self.say(f"run {run_id} was reassigned to another connector after this one's "
                         f"lease ran out; its result was refused and discarded (stale claim "
                         f"{last.get('fence')})")
            else:
                verb = {"COMPLETED": "finished", "FAILED": "failed",
                        "DELETED": "ended (job deleted)"}.get(outcome, f"ended {outcome}")
                self.say(f"run {run_id} {verb}{how} (job {last.get('job_id')}, server "
                         f"{last.get('server_id')})")
            return outcome

        def logged_upload():
            n = upload()
            self.say(f"catalog uploaded: {n} VMs")
            return n

        executor.execute, loop.upload_catalog = logged_execute, logged_upload
        executor.cp.claim = logged_claim

    def say(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        print(f"{stamp} connector {self.loop.connector_id}: {text}", file=self.stream, flush=True)


def _remote_run(args, connector_dir) -> int:
    from ..service.connector import ConnectorLoop
    from ..service.controlplane import RemoteControlPlane
    from ..service.executor import RunExecutor, default_image_step
    doc = _remote_settings(connector_dir)
    cp = RemoteControlPlane(doc["endpoint"], doc["accessKeyId"], doc["secretAccessKey"],
                            doc["connectorId"], region=doc.get("region") or "us-east-1",
                            ca_bundle=doc.get("caBundle"), insecure=bool(doc.get("insecure")),
                            source_kind=doc["sourceKind"], source_config=doc["sourceConfig"])
    executor = RunExecutor(None, time.time, control_plane=cp,
                           image_step=default_image_step(connector_dir))
    loop = ConnectorLoop(control_plane=cp, executor=executor, lock_dir=connector_dir,
                         heartbeat_interval=args.heartbeat_interval,
                         catalog_interval=args.catalog_interval)
    events = _RemoteEventLog(loop)
    try:
        with loop:
            events.say(f"control plane {cp.endpoint}")
            return _drive(args, loop, events)
    finally:
        cp.close()


def _credential(args) -> int:
    from ..service.fleet import Fleet
    with _service(args) as svc:
        fleet = Fleet(svc.state, svc.clock, svc.config)
        if args.credential_command == "create":
            print_json(fleet.create_credential(args.store, args.description), schema=False)
        elif args.credential_command == "list":
            print_json({"credentials": fleet.list_credentials()}, schema=False)
        else:
            try:
                print_json(fleet.revoke_credential(args.access_key_id), schema=False)
            except ServiceError as e:
                raise UsageError(str(e)) from None
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
        server = make_server(svc, args.host, args.port, region=args.region,
                             tls_cert=args.tls_cert, tls_key=args.tls_key)
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
                     help="PEM CA certificate(s) that signed vCenter's certificate (and, with "
                          "--endpoint, the control plane's)")
    reg.add_argument("--insecure", action="store_true",
                     help="ignore hostname mismatch and expiration errors for vCenter and "
                          "ESXi certificates (the chain is still verified); with --endpoint: "
                          "do not verify the control plane's certificate at all")
    reg.add_argument("--source-kind", metavar="KIND",
                     help="another source kind: one a plugin declares (entry point group "
                          "smsblock.sources)")
    reg.add_argument("--source-config", metavar="JSON|@FILE",
                     help="the --source-kind's config, a JSON object (default {}); "
                          "stored in the state: no secrets")
    reg.add_argument("--store", metavar="PATH_OR_URL",
                     help="block store for this connector's runs (default: STATE/store)")
    remote = reg.add_argument_group("remote connector (docs/fleet.md)")
    remote.add_argument("--endpoint", metavar="URL",
                        help="register with the `smsblock serve` at URL (https://...) instead "
                             "of a local --state")
    remote.add_argument("--connector-dir", metavar="DIR",
                        help="where the remote connector keeps its settings (default "
                             f"${CONNECTOR_HOME_ENV} or ~/.smsblock-connector)")
    remote.add_argument("--access-key-id", metavar="ID")
    remote.add_argument("--secret-access-key", metavar="SECRET",
                        help="(visible to other users in ps: prefer the file or environment)")
    remote.add_argument("--secret-access-key-file", metavar="FILE")
    remote.add_argument("--credentials-file", metavar="FILE",
                        help="the JSON `smsblock connector credential create` printed")
    remote.add_argument("--region", type=_region, default="us-east-1",
                        help="the region `serve` runs as (default us-east-1)")
    reg.set_defaults(func=_connector_register)

    run = conn_sub.add_parser("run", help="heartbeat, schedule and execute due runs")
    _add_state(run)
    run.add_argument("--connector-id", help="which connector (default: the only one)")
    run.add_argument("--once", action="store_true", help="do what is due now, print it, exit")
    run.add_argument("--poll-interval", type=float, default=10.0, metavar="SECONDS")
    run.add_argument("--heartbeat-interval", type=float, default=30.0, metavar="SECONDS")
    run.add_argument("--connector-dir", metavar="DIR",
                     help="run the remote connector registered there (default: "
                          f"${CONNECTOR_HOME_ENV} when set; else local --state)")
    run.add_argument("--catalog-interval", type=float, default=3600.0, metavar="SECONDS",
                     help="remote connector: how often its VM list is uploaded (and at start)")
    run.set_defaults(func=_connector_run)

    cred = conn_sub.add_parser("credential", help="connector credentials (operator side; "
                                                  "docs/fleet.md)")
    cred_sub = cred.add_subparsers(dest="credential_command", metavar="ACTION", required=True)
    create = cred_sub.add_parser("create", help="a new connector id and key pair; prints the "
                                                "secret once")
    _add_state(create)
    create.add_argument("--store", metavar="PATH_OR_URL", required=True,
                        help="the block store the connector replicates into (s3://BUCKET/PREFIX "
                             "for a fleet)")
    create.add_argument("--description")
    create.set_defaults(func=_credential)
    listing = cred_sub.add_parser("list", help="connector credentials (never their secrets)")
    _add_state(listing)
    listing.set_defaults(func=_credential)
    revoke = cred_sub.add_parser("revoke", help="refuse a connector credential from now on")
    _add_state(revoke)
    revoke.add_argument("access_key_id", metavar="ACCESS_KEY_ID")
    revoke.set_defaults(func=_credential)

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
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="serve HTTPS (TLS 1.2+) with this PEM certificate chain")
    serve.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    serve.set_defaults(func=_serve)
