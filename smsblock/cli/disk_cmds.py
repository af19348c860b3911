"""``smsblock info | convert``: look at a disk image, copy it to raw or streamOptimized VMDK."""

from __future__ import annotations

import json
import os
import time

from ..errors import UsageError
from ..progress import terminal_progress
from . import add_json_flag, add_mode_flag

OUTPUT_FORMATS = ("raw", "vmdk")


def human_size(n: int) -> str:
    """``10485760`` → ``10 MiB``; exact units stay short, others get one decimal."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n} B"
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _add_source_options(p) -> None:
    p.add_argument("-f", "--format", dest="src_format", metavar="FMT",
                   help="the source's format, raw or vmdk (detected by default)")
    p.add_argument("--ignore-cid-mismatch", action="store_true",
                   help="open a snapshot child whose parentCID differs from its parent's CID")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="follow descriptor extents and parents outside the descriptor's folder")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="show a disk image's format, size, extents and parents",
        description="Show what smsblock reads in a disk image: format, VMDK createType, "
                    "virtual size, allocated bytes, extent files, CID/parentCID, adapter "
                    "type and the snapshot parent chain.")
    p.add_argument("disk", metavar="DISK", help="a raw image or a VMDK (descriptor or sparse file)")
    _add_source_options(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser(
        "convert", help="copy a disk image to raw or streamOptimized VMDK",
        description="Copy any disk smsblock reads to a sparse raw image or to a "
                    "streamOptimized VMDK (the format of OVF exports and VM Import). "
                    "DST appears only when complete.")
    p.add_argument("src", metavar="SRC", help="the disk to read")
    p.add_argument("dst", metavar="DST", help="the file to write (replaced if it exists)")
    p.add_argument("-O", dest="output_format", metavar="FMT",
                   help="raw or vmdk (default: vmdk when DST ends in .vmdk, else raw)")
    p.add_argument("--adapter-type", metavar="TYPE",
                   help="ddb.adapterType of a VMDK output: ide, buslogic, lsilogic, legacyESX "
                        "(default: the source's, else lsilogic)")
    _add_source_options(p)
    add_mode_flag(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_convert)


def _open(args, path):
    from ..disk import open_disk
    return open_disk(path, format=args.src_format, ignore_cid_mismatch=args.ignore_cid_mismatch,
                     allow_outside_paths=args.allow_outside_paths)


def info_document(disk) -> dict:
    """The JSON form of ``smsblock info``: DiskInfo plus the allocated byte count."""
    doc = disk.info.to_dict()
    doc["virtual_size"] = disk.size
    doc["allocated_bytes"] = disk.allocated_bytes()
    return doc


def _info_lines(doc: dict) -> list[str]:
    rows = [("file", doc["path"]), ("format", doc["format"])]
    if doc.get("create_type"):
        rows.append(("create type", doc["create_type"]))
    rows.append(("virtual size", f"{human_size(doc['virtual_size'])} ({doc['virtual_size']} bytes)"))
    rows.append(("allocated", f"{human_size(doc['allocated_bytes'])} ({doc['allocated_bytes']} bytes)"))
    if doc.get("compressed"):
        rows.append(("compressed", "yes (deflate grains)"))
    if doc.get("cid") is not None:
        rows.append(("CID", doc["cid"]))
    if doc.get("parent_cid") is not None:
        pcid = doc["parent_cid"]
        rows.append(("parent CID", pcid + (" (no parent)" if pcid == "ffffffff" else "")))
    if doc.get("adapter_type"):
        rows.append(("adapter type", doc["adapter_type"]))
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{k + ':':<{width}} {v}" for k, v in rows]
    lines.append("extents:")
    for e in doc.get("extents") or []:
        where = f' "{e["path"]}"' if e.get("path") else ""
        offset = f" {e['offset']}" if e.get("offset") else ""
        lines.append(f"  {e['access']} {e['sectors']} {e['type']}{where}{offset}")
    chain = doc.get("parent_chain") or []
    lines.append("parent chain:" + ("" if chain else " none"))
    parent = doc.get("parent")
    for depth, path in enumerate(chain, 1):
        cid = f" (CID {parent['cid']})" if parent and parent.get("cid") else ""
        lines.append(f"  {depth}. {path}{cid}")
        parent = parent.get("parent") if parent else None
    return lines


def cmd_info(args) -> int:
    with _open(args, args.disk) as disk:
        doc = info_document(disk)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print("\n".join(_info_lines(doc)))
    return 0


def cmd_convert(args) -> int:
    from ..disk.writer import convert, format_for_path, write_stream_optimized

    fmt = args.output_format or format_for_path(args.dst)
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {fmt!r} for -O (expected raw or vmdk)")
    if args.adapter_type and fmt != "vmdk":
        raise UsageError("--adapter-type applies to -O vmdk only")
    started = time.monotonic()
    with _open(args, args.src) as disk, \
            terminal_progress(f"convert {os.path.basename(args.src)}") as bar:
        if args.adapter_type:
            write_stream_optimized(disk, args.dst, progress=bar, adapter_type=args.adapter_type,
                                   mode=args.mode)
        else:
            convert(disk, args.dst, format=fmt, progress=bar, mode=args.mode)
        size = disk.size
    seconds = time.monotonic() - started
    st = os.stat(args.dst)
    on_disk = st.st_blocks * 512        # a sparse raw file's size says little
    if args.json:
        print(json.dumps({"source": args.src, "output": args.dst, "format": fmt,
                          "create_type": "streamOptimized" if fmt == "vmdk" else None,
                          "virtual_size": size, "file_size": st.st_size,
                          "allocated_bytes": on_disk,
                          "seconds": round(seconds, 3)}, indent=2, sort_keys=True))
    else:
        kind = "streamOptimized VMDK" if fmt == "vmdk" else "sparse raw"
        print(f"{args.dst}: {kind}, {human_size(size)} virtual, {human_size(on_disk)} "
              f"on disk, {seconds:.2f} s")
    return 0
