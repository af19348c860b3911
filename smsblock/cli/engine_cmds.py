"""``smsblock replicate | runs | restore | verify | prune``: the replication engine's commands."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading

from ..errors import UsageError
from ..progress import CancelToken, terminal_progress
from . import add_json_flag, add_mode_flag
from .disk_cmds import human_size

_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([KMG]?)(i?B)?\s*", re.IGNORECASE)   # fullmatch
STORE_HELP = "store: a directory (created on first use), s3://BUCKET/PREFIX or ebs://[REGION]"


def parse_size(text: str) -> int:
    """``524288``, ``512K``, ``512KiB``, ``1M`` -> bytes (binary units)."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise UsageError(f"bad size {text!r} (use e.g. 524288, 512K, 1M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def _print_json(doc) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


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


def cmd_replicate(args) -> int:
    from ..disk import open_disk
    from ..engine import replicate
    block_size = parse_size(args.block_size) if args.block_size else None
    with open_disk(args.disk) as disk, terminal_progress(f"replicate {args.server}") as bar, \
            cancel_on_interrupt() as token:
        s = replicate(disk, args.store, args.server, block_size=block_size, progress=bar,
                      cancel=token)
    if args.json:
        _print_json(s.to_dict())
    else:
        print(f"run {s.run_id}: {s.blocks_total} blocks ({s.blocks_data} data, {s.blocks_zero} zero, "
              f"{s.blocks_unallocated} unallocated), {s.blocks_changed} changed, "
              f"{s.blocks_stored} stored ({human_size(s.bytes_stored)} compressed of "
              f"{human_size(s.bytes_stored_uncompressed)}), read {human_size(s.bytes_read)} in {s.seconds:.2f} s")
    return 0


def cmd_runs(args) -> int:
    from ..store import open_store
    store = open_store(args.store)
    store.require()
    runs = store.runs(args.server)
    if args.json:
        _print_json({"server_id": args.server, "runs": [r.to_dict() for r in runs]})
        return 0
    if not runs:
        print(f"no runs of server {args.server}")
    for r in runs:
        s = r.summary
        print(f"{r.run_id}  {r.created}  {s.get('blocks_total', '?')} blocks, "
              f"{s.get('blocks_changed', '?')} changed, {s.get('blocks_stored', '?')} stored")
    return 0


def cmd_restore(args) -> int:
    from ..engine import restore
    with terminal_progress(f"restore {args.server}") as bar, cancel_on_interrupt() as token:
        m = restore(args.store, args.server, args.output, run_id=args.run, format=args.output_format,
                    progress=bar, cancel=token, mode=args.mode)
    print(f"restored run {m.meta.get('run_id')} of {args.server} to {args.output} "
          f"({args.output_format}, {human_size(m.disk_size)})")
    return 0


def cmd_verify(args) -> int:
    from ..engine import verify
    with terminal_progress("verify") as bar, cancel_on_interrupt() as token:
        report = verify(args.store, progress=bar, cancel=token)
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


def cmd_prune(args) -> int:
    from ..engine import prune
    if args.keep < 0:
        raise UsageError(f"--keep must be 0 or more, not {args.keep}")
    with terminal_progress("prune") as bar:
        r = prune(args.store, args.server, args.keep, progress=bar)
    if args.json:
        _print_json(r.to_dict())
    else:
        print(f"deleted {len(r.runs_deleted)} runs, kept {len(r.runs_kept)}; "
              f"{r.packs_deleted} packs deleted, {r.packs_rewritten} rewritten, "
              f"{r.blocks_deleted} blocks and {r.leftovers_removed} leftovers removed, "
              f"{human_size(r.bytes_freed)} freed"
              + (f"; {r.packs_left} packs kept whole for want of space (prune again later)"
                 if r.packs_left else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("replicate", help="replicate a disk into a store (one incremental run)")
    p.add_argument("disk", help="disk image (raw or VMDK)")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--server", required=True, help="server id the run belongs to")
    p.add_argument("--block-size", help="block size, a power of two from 64K to 4M "
                   "(default: the previous run's, else 512K)")
    add_json_flag(p)
    p.set_defaults(func=cmd_replicate)

    p = sub.add_parser("runs", help="list a server's completed runs, oldest first")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--server", required=True)
    add_json_flag(p)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("restore", help="write a disk as it was at a run")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--server", required=True)
    p.add_argument("--run", help="run id (default: the latest)")
    p.add_argument("-o", "--output", required=True, help="output image path")
    p.add_argument("-O", "--output-format", choices=["raw", "vmdk"], default="raw",
                   help="raw (sparse) or vmdk (streamOptimized); default raw")
    add_mode_flag(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("verify", help="check every pack, block and run of a store")
    p.add_argument("--store", required=True, help=STORE_HELP)
    add_json_flag(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", help="keep a server's newest N runs and delete unreferenced blocks")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--server", required=True)
    p.add_argument("--keep", required=True, type=int, help="how many of the newest runs to keep")
    add_json_flag(p)
    p.set_defaults(func=cmd_prune)
