"""``smsblock init | replicate | servers | runs | publish | restore | verify | prune``:
the replication engine's commands."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading

from ..errors import RunNotFoundError, UsageError
from ..fsutil import read_small_file
from ..progress import CancelToken, human_size, terminal_progress
from . import add_json_flag, add_mode_flag, add_store_option, print_json
from .disk_cmds import output_format
from .scan_cmds import parse_size



def _print_json(doc) -> None:
    print_json(doc)


@contextlib.contextmanager
def cancel_on_interrupt():
    """A CancelToken that Ctrl-C (SIGINT) cancels: the run stops at its next safe point,
    seals what it stored, and raises Cancelled (exit status 130)."""
    token = CancelToken()
    if threading.current_thread() is not threading.main_thread():
        yield token
        return
    previous = signal.signal(signal.SIGINT, lambda *_: token.cancel("interrupted"))
    try:
        yield token
    finally:
        signal.signal(signal.SIGINT, previous)


#: bytes of a --changed-extents file (about 400,000 extents; longer lists: the Python API)
MAX_CHANGED_EXTENTS_FILE = 16 << 20


def read_changed_extents(path: str) -> list[tuple[int, int]]:
    """``--changed-extents FILE``: ``{"extents": [{"offset": O, "length": L}, ...]}``,
    byte offsets and lengths, from a regular file of at most MAX_CHANGED_EXTENTS_FILE
    bytes.  Returns the pairs; their order and bounds are checked by replicate."""
    import json
    where = f"--changed-extents {path}"
    try:
        raw = read_small_file(path, MAX_CHANGED_EXTENTS_FILE)
    except OSError as e:
        raise UsageError(f"{where}: {e.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UsageError(f"{where}: bad JSON: " + " ".join(str(e).split())[:200]) from None
    if not isinstance(doc, dict) or set(doc) != {"extents"} or not isinstance(doc["extents"], list):
        raise UsageError(f'{where}: must be a JSON object {{"extents": [{{"offset": O, '
                         f'"length": L}}, ...]}} and nothing else')
    out = []
    for i, e in enumerate(doc["extents"]):
        if not isinstance(e, dict) or set(e) != {"offset", "length"}:
            raise UsageError(f'{where}: extent {i} must be an object {{"offset": O, '
                             f'"length": L}} and nothing else')
        for key in ("offset", "length"):
            if isinstance(e[key], bool) or not isinstance(e[key], int):
                raise UsageError(f"{where}: extent {i}: {key} must be an integer, not "
                                 f"{json.dumps(e[key])[:40]}")
        out.append((e["offset"], e["length"]))
    return out


def cmd_replicate(args) -> int:
    from ..disk import open_disk
    from ..engine import replicate
    block_size = parse_size(args.block_size) if args.block_size else None
    changed = read_changed_extents(args.changed_extents) if args.changed_extents else None
    with open_disk(args.disk) as disk, \
            terminal_progress(f"replicate {args.server}: scan and store") as bar, \
            cancel_on_interrupt() as token:
        s = replicate(disk, args.store, args.server, block_size=block_size, progress=bar,
                      cancel=token, create=args.create, change_block_size=args.change_block_size,
                      changed_extents=changed)
    if args.json:
        _print_json(s.to_dict())
    else:
        print(f"run {s.run_id}: {s.blocks_total} blocks ({s.blocks_data} data, {s.blocks_zero} zero, "
              f"{s.blocks_unallocated} unallocated), {s.blocks_changed} changed, "
              f"{s.blocks_stored} stored ({human_size(s.bytes_stored)} compressed of "
              f"{human_size(s.bytes_stored_uncompressed)}), read {human_size(s.bytes_read)} in {s.seconds:.2f} s")
        _print_published(s.published)
    return 0


def _print_published(published: dict) -> None:
    ebs = published.get("ebs")
    if ebs:
        parent = ebs.get("parent_snapshot_id")
        print(f"snapshot {ebs['snapshot_id']} ({ebs.get('changed_blocks', '?')} blocks written"
              + (f", parent {parent})" if parent else ", no parent)"))


def cmd_publish(args) -> int:
    from ..store import open_store
    store = open_store(args.store)
    store.require()
    if not store.publishers:
        raise UsageError(f"{store.url}: this store has nothing to publish runs to (an "
                         f"ebs:// store publishes each run as an EBS snapshot)")
    run_id = args.run or store.latest_run_id(args.server)
    if run_id is None:
        raise RunNotFoundError(f"{store.url}: no runs of server {args.server!r}")
    with terminal_progress(f"publish {args.server}") as bar, cancel_on_interrupt() as token:
        published = store.publish_run(args.server, run_id, progress=bar, cancel=token)
    if args.json:
        _print_json({"store": store.url, "server_id": args.server, "run_id": run_id,
                     "published": published})
    else:
        _print_published(published)
    return 0


def cmd_init(args) -> int:
    from ..store import StoreConfig, open_store
    store = open_store(args.store)
    existed = store.exists()
    cfg = store.initialise(StoreConfig(address=args.address) if args.address else None)
    if args.json:
        _print_json({"store": store.url, "created": not existed, "config": dataclasses.asdict(cfg)})
    else:
        print(f"{store.url}: {'store exists already' if existed else 'store created'} "
              f"({cfg.address} content addresses)")
    return 0


def cmd_servers(args) -> int:
    from ..store import open_store
    store = open_store(args.store)
    store.require()
    servers = []
    for server_id in store.list_servers():
        runs = store.runs(server_id)
        if not runs:
            continue
        latest = runs[-1]
        servers.append({
            "server_id": server_id, "run_count": len(runs),
            "latest_run_id": latest.run_id, "latest_run_created": latest.created,
            "disk_size": latest.summary.get("disk_size"),
            # what this server's runs added to the store (blocks shared with other
            # servers count once, for the run that stored them first)
            "bytes_stored": sum(int(r.summary.get("bytes_stored") or 0) for r in runs)})
    if args.json:
        _print_json({"store": store.url, "servers": servers})
        return 0
    if not servers:
        print(f"{store.url}: no servers (the store holds no runs)")
        return 0
    width = max([6] + [len(s["server_id"]) for s in servers])
    print(f"{'SERVER':<{width}}  RUNS  {'LATEST RUN':<44}  {'DISK SIZE':>10}  {'STORED':>10}")
    for s in servers:
        size = human_size(s["disk_size"]) if s["disk_size"] is not None else "?"
        print(f"{s['server_id']:<{width}}  {s['run_count']:>4}  {s['latest_run_id']:<44}  "
              f"{size:>10}  {human_size(s['bytes_stored']):>10}")
    return 0


def cmd_runs(args) -> int:
    from ..store import open_store
    store = open_store(args.store)
    store.require()
    runs = store.runs(args.server)
    if args.json:
        _print_json({"store": store.url, "server_id": args.server,
                     "runs": [r.to_dict() for r in runs]})
        return 0
    if not runs:
        print(f"no runs of server {args.server} in {store.url}")
    for r in runs:
        s = r.summary
        snapshot = ""
        if "snapshot_id" in s:          # an ebs:// store: None while not published
            snapshot = f", snapshot {s['snapshot_id'] or 'not published'}"
        print(f"{r.run_id}  {r.created}  {s.get('blocks_total', '?')} blocks, "
              f"{s.get('blocks_changed', '?')} changed, {s.get('blocks_stored', '?')} stored"
              f"{snapshot}")
    return 0


def cmd_restore(args) -> int:
    from ..engine import restore
    from ..store import open_store
    fmt = output_format(args.output, args.output_format)
    store = open_store(args.store)
    store.require()
    with terminal_progress(f"restore {args.server}: write {fmt}") as bar, \
            cancel_on_interrupt() as token:
        m = restore(store, args.server, args.output, run_id=args.run, format=fmt,
                    progress=bar, cancel=token, mode=args.mode)
    if args.json:
        _print_json({"store": store.url, "server_id": args.server, "run_id": m.meta.get("run_id"),
                     "output": args.output, "format": fmt, "disk_size": m.disk_size})
    else:
        print(f"restored run {m.meta.get('run_id')} of {args.server} to {args.output} "
              f"({fmt}, {human_size(m.disk_size)})")
    return 0


def cmd_verify(args) -> int:
    from ..engine import verify
    from ..store import open_store
    if args.deep:
        return _verify_deep(args)
    if args.server or args.disk or args.run:
        raise UsageError("--server, --disk and --run go with --deep")
    store = open_store(args.store)
    store.require()
    with terminal_progress("verify: read and check every pack") as bar, cancel_on_interrupt() as token:
        report = verify(store, progress=bar, cancel=token)
    if args.json:
        _print_json(report.to_dict())
    else:
        for p in report.problems:
            print(f"problem: {p}")
        print(f"{'OK' if report.ok else 'FAILED'}: {report.packs_checked} packs, "
              f"{report.blocks_checked} blocks, {report.runs_checked} runs checked, "
              f"{len(report.problems)} problems; {report.unreferenced_packs} unreferenced packs, "
              f"{len(report.leftovers)} leftovers (prune removes them)")
    return 0 if report.ok else 1


def _verify_deep(args) -> int:
    from ..engine import verify_run_against_disk
    if not args.server or not args.disk:
        raise UsageError("verify --deep needs --server ID and --disk DISK")
    with terminal_progress(f"verify {args.server}: re-read the whole disk") as bar, \
            cancel_on_interrupt() as token:
        r = verify_run_against_disk(args.store, args.server, args.disk, args.run,
                                    progress=bar, cancel=token)
    if args.json:
        _print_json(r.to_dict())
    else:
        for p in r.problems:
            print(f"problem: {p}")
        print(f"{'OK' if r.ok else 'FAILED'}: run {r.server_id}/{r.run_id}: "
              f"{r.blocks_checked} blocks compared with {args.disk}, "
              f"{r.blocks_differing} differ; read {human_size(r.bytes_read)}")
    return 0 if r.ok else 1


def cmd_prune(args) -> int:
    from ..engine import prune
    from ..store import open_store
    if args.keep < 0:
        raise UsageError(f"--keep must be 0 or more, not {args.keep}")
    if args.keep == 0 and not args.delete_all:
        # as borg and restic: deleting every run takes an explicit rule, not a typo
        raise UsageError(f"--keep 0 deletes every run of server {args.server}: add --delete-all "
                         f"to mean it (try --dry-run first)")
    if args.delete_all and args.keep != 0:
        raise UsageError("--delete-all goes with --keep 0 only")
    store = open_store(args.store)
    store.require()
    if not store.list_run_ids(args.server):     # a mistyped id is an error, not a no-op
        raise RunNotFoundError(f"{store.url}: no runs of server {args.server!r} "
                               f"(smsblock servers --store {store.url} lists them)")
    with terminal_progress("prune: rewrite and delete packs") as bar:
        r = prune(store, args.server, args.keep, progress=bar, dry_run=args.dry_run)
    if args.json:
        _print_json({"store": store.url, "server_id": args.server, "dry_run": args.dry_run,
                     **r.to_dict()})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for run_id in r.runs_deleted:
        print(f"{verb} run {run_id}")
    print(f"{'dry run: ' if args.dry_run else ''}{verb} {len(r.runs_deleted)} runs, "
          f"kept {len(r.runs_kept)}; {r.packs_deleted} packs deleted, "
          f"{r.packs_rewritten} rewritten, {r.blocks_deleted} blocks and "
          f"{r.leftovers_removed} leftovers removed, {human_size(r.bytes_freed)} freed"
          + (f"; {r.packs_left} packs kept whole for want of space (prune again later)"
             if r.packs_left else "")
          + (" (nothing was changed)" if args.dry_run else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("init", help="create a store (the only way, with replicate --create)",
                       description="Create an empty store at STORE (a directory, "
                                   "s3://BUCKET/PREFIX or ebs://[REGION]). An existing store "
                                   "is left as it is.")
    p.add_argument("store", metavar="STORE", help="where to create the store")
    p.add_argument("--address", choices=["blake3", "sha256"],
                   help="content-address hash of the stored blocks (default blake3)")
    add_json_flag(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("replicate", help="replicate a disk into a store (one incremental run)")
    p.add_argument("disk", help="disk image (raw or VMDK)")
    add_store_option(p)
    p.add_argument("--server", required=True, help="server id the run belongs to")
    p.add_argument("--create", action="store_true",
                   help="create the store if it does not exist (otherwise: an error)")
    p.add_argument("--block-size", help="block size, a power of two from 64K to 4M "
                   "(default: the previous run's, else 512K)")
    p.add_argument("--change-block-size", action="store_true",
                   help="accept a --block-size other than the previous run's (stores the "
                        "whole disk again)")
    p.add_argument("--changed-extents", metavar="FILE",
                   help='JSON {"extents": [{"offset": O, "length": L}, ...]} (bytes, '
                        "sorted, not overlapping): what changed since the previous run; "
                        "only those blocks are read, the others are carried over")
    add_json_flag(p)
    p.set_defaults(func=cmd_replicate)

    p = sub.add_parser("servers", help="list a store's servers: runs, latest run, size")
    add_store_option(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_servers)

    p = sub.add_parser("runs", help="list a server's completed runs, oldest first")
    add_store_option(p)
    p.add_argument("--server", required=True)
    add_json_flag(p)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("publish", help="publish a stored run again (ebs://: as an EBS snapshot)",
                       description="Publish a run that is stored but whose publishing failed "
                                   "(an ebs:// store makes each run an EBS snapshot after the "
                                   "run is committed). A run already published is left as it is.")
    add_store_option(p)
    p.add_argument("--server", required=True)
    p.add_argument("--run", help="run id (default: the latest)")
    add_json_flag(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("restore", help="write a disk as it was at a run")
    add_store_option(p)
    p.add_argument("--server", required=True)
    p.add_argument("--run", help="run id (default: the latest)")
    p.add_argument("-o", "--output", required=True, help="output image path")
    p.add_argument("-O", "--output-format", metavar="FMT",
                   help="raw (sparse) or vmdk (streamOptimized); default: vmdk when the "
                        "output ends in .vmdk, else raw")
    add_json_flag(p)
    add_mode_flag(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("verify", help="check every pack, block and run of a store")
    add_store_option(p)
    p.add_argument("--deep", action="store_true",
                   help="instead: re-read the whole --disk and compare it with a run of "
                        "--server, block by block (proves a --changed-extents run)")
    p.add_argument("--server", help="with --deep: the server id")
    p.add_argument("--disk", help="with --deep: the disk image to re-read")
    p.add_argument("--run", help="with --deep: the run id (default: the latest)")
    add_json_flag(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", help="keep a server's newest N runs and delete unreferenced blocks")
    add_store_option(p)
    p.add_argument("--server", required=True)
    p.add_argument("--keep", required=True, type=int, help="how many of the newest runs to keep")
    p.add_argument("--delete-all", action="store_true",
                   help="with --keep 0: yes, delete every run of the server")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing; print what would be deleted")
    add_json_flag(p)
    p.set_defaults(func=cmd_prune)
