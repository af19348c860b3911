"""``smsblock scan`` (disk → manifest) and ``smsblock diff`` (changed blocks of two manifests)."""

from __future__ import annotations

import re

import numpy as np

from . import add_json_flag, print_json
from ..errors import UsageError
from ..manifest import (DEFAULT_BLOCK_SIZE, BlockState, ManifestReader, ManifestWriter,
                        check_block_size, iter_diff)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Parse ``524288``, ``512K``, ``512KiB``, ``1M``, ``4MiB`` (binary units) into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot read size {text!r} (examples: 524288, 512K, 1MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_block_size(text: str) -> int:
    return check_block_size(parse_size(text))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "scan", help="cut a disk into blocks, hash them and write a run manifest",
        description="Read the allocated blocks of DISK, classify each block (data, zero, "
                    "unallocated), hash data blocks with xxh3-128 and write the manifest.")
    p.add_argument("disk", metavar="DISK", help="disk image (raw or VMDK)")
    p.add_argument("-o", "--output", required=True, metavar="MANIFEST", help="manifest file to write")
    p.add_argument("--block-size", default=str(DEFAULT_BLOCK_SIZE),
                   metavar="SIZE", help="power of two from 64K to 4M (default 512K)")
    p.add_argument("--previous", metavar="MANIFEST",
                   help="an earlier manifest of the same disk: count the blocks changed since")
    p.add_argument("-f", "--format", choices=["raw", "vmdk"], help="disk format (default: detect)")
    p.add_argument("--threads", type=int, default=2, help="worker threads (default 2)")
    add_json_flag(p)
    p.set_defaults(func=cmd_scan)

    p = subparsers.add_parser(
        "diff", help="list the blocks that differ between two manifests",
        description="Print the indices of blocks whose state or hash differs between OLD "
                    "and NEW (blocks beyond the shorter disk count as changed).")
    p.add_argument("old", metavar="OLD", help="older manifest")
    p.add_argument("new", metavar="NEW", help="newer manifest")
    add_json_flag(p)
    p.set_defaults(func=cmd_diff)


def cmd_scan(args) -> int:
    import os
    import uuid

    from ..disk import open_disk
    from ..fsutil import fsync_dir
    from ..progress import terminal_progress
    from ..scanner import Gap, scan_meta, scan_stream

    block_size = parse_block_size(args.block_size)
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, not {args.threads}")
    previous = ManifestReader(args.previous) if args.previous else None
    # written window by window to a new private file beside the output, renamed over it
    # when complete: memory does not follow the disk's size, a failed scan leaves nothing
    folder = os.path.dirname(os.path.abspath(args.output))
    tmp = os.path.join(folder, f".{uuid.uuid4().hex}.manifest.tmp")
    try:
        with open_disk(args.disk, format=args.format) as disk, \
                terminal_progress(f"scan {args.disk}: read and hash",
                                  enabled=None if not args.json else False) as bar:
            try:
                writer = ManifestWriter(tmp, disk.size, block_size)
            except OSError as e:
                raise UsageError(f"{args.output}: cannot write here: {e.strerror}") from None
            try:
                meta = scan_meta(disk)
                stream = scan_stream(disk, block_size=block_size, previous=previous,
                                     threads=args.threads, progress=bar)
                for seg in stream:
                    if isinstance(seg, Gap):
                        writer.add_run(BlockState.UNALLOCATED, seg.end - seg.start)
                    else:
                        writer.add_window(seg.states, seg.hashes)
                meta["scan"] = dict(stream.stats)
                try:
                    digest = writer.finish(meta)        # fsynced
                    os.replace(tmp, args.output)
                    fsync_dir(folder)                   # the rename too
                except OSError as e:
                    raise UsageError(f"{args.output}: cannot write: {e.strerror}") from None
            except BaseException:
                writer.abort()
                raise
    finally:
        if previous is not None:
            previous.close()
    stats = meta["scan"]
    counts = {"blocks_total": writer.n_blocks,
              "blocks_data": writer.counts[BlockState.DATA],
              "blocks_zero": writer.counts[BlockState.ZERO],
              "blocks_unallocated": writer.counts[BlockState.UNALLOCATED]}
    out = {"manifest": args.output, "source": args.disk, "disk_size": writer.disk_size,
           "block_size": block_size, **counts,
           "blocks_changed": stats.get("blocks_changed"),
           "bytes_read": stats.get("bytes_read"), "seconds": stats.get("seconds"),
           "digest": digest.hex()}
    if args.json:
        print_json(out)
    else:
        changed = f", {out['blocks_changed']} changed" if previous is not None else ""
        print(f"{args.disk}: {out['blocks_total']} blocks of {block_size} bytes: "
              f"{out['blocks_data']} data, {out['blocks_zero']} zero, "
              f"{out['blocks_unallocated']} unallocated{changed}; read {out['bytes_read']} bytes "
              f"in {out['seconds']:.3f} s -> {args.output}")
    return 0


def _ranges(indices) -> str:
    """``[0,1,2,5,7,8]`` → ``0-2,5,7-8`` (diffs of big disks stay readable)."""
    indices = np.asarray(indices, np.int64)
    if len(indices) == 0:
        return "-"
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    parts = []
    for run in np.split(indices, breaks):
        a, b = int(run[0]), int(run[-1])
        parts.append(str(a) if a == b else f"{a}-{b}")
    return ",".join(parts)


def cmd_diff(args) -> int:
    with ManifestReader(args.old) as old, ManifestReader(args.new) as new:
        kinds = dict.fromkeys(("data_modified", "became_data", "became_zero",
                               "became_unallocated", "size_changed"), 0)
        changed = []            # the output lists every changed block: it is what was asked
        for _start, _end, o, w, idx in iter_diff(old, new):
            changed.append(idx)        # o and w: the one state of each side here
            if o is None or w is None:
                kinds["size_changed"] += len(idx)
                continue
            data, zero, unalloc = BlockState.DATA, BlockState.ZERO, BlockState.UNALLOCATED
            kinds["data_modified"] += len(idx) if o == data and w == data else 0
            kinds["became_data"] += len(idx) if o != data and w == data else 0
            kinds["became_zero"] += len(idx) if o != zero and w == zero else 0
            kinds["became_unallocated"] += len(idx) if o != unalloc and w == unalloc else 0
        changed = np.concatenate(changed) if changed else np.zeros(0, np.int64)
        out = {"changed": changed.tolist(), "changed_count": int(len(changed)),
               "blocks_total": max(old.n_blocks, new.n_blocks), "block_size": new.block_size,
               "old_disk_size": old.disk_size, "new_disk_size": new.disk_size, **kinds}
    if args.json:
        print_json(out)
    else:
        print(f"{out['changed_count']} of {out['blocks_total']} blocks changed "
              f"({kinds['data_modified']} modified, {kinds['became_data']} became data, "
              f"{kinds['became_zero']} became zero, {kinds['became_unallocated']} became "
              f"unallocated, {kinds['size_changed']} from the size change)")
        print(f"changed: {_ranges(changed)}")
    return 0
