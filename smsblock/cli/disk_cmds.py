"""``smsblock info | convert``: look at a disk image, copy it to raw or streamOptimized VMDK."""

from __future__ import annotations

import os
import time

from ..errors import UsageError
from ..progress import human_size, terminal_progress
from . import add_json_flag, add_mode_flag, print_json

OUTPUT_FORMATS = ("raw", "vmdk")
# what a file name's suffix says its format is: smsblock writes raw and vmdk only, so a
# name that says another format is a mistake, not a raw file under a misleading name
# (.img and .bin say nothing: any format may go under them)
_SUFFIX_FORMATS = {".vmdk": "vmdk", ".raw": "raw",
                   ".qcow2": "qcow2", ".qcow": "qcow", ".vhd": "vhd", ".vhdx": "vhdx",
                   ".vdi": "vdi", ".ova": "ova", ".ovf": "ovf", ".iso": "iso"}


def output_format(path, fmt: str | None, option: str = "-O") -> str:
    """The format to write ``path`` in: ``fmt`` when given, else the name's (raw by
    default).  Refuses with one line an unknown format and a name whose suffix says
    another format than the one written (``out.qcow2``, ``-O raw`` to ``x.vmdk``)."""
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {fmt!r} for {option} (smsblock writes raw or vmdk)")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    named = _SUFFIX_FORMATS.get(suffix)
    if named is not None and named not in OUTPUT_FORMATS:
        raise UsageError(f"{path}: the name says {named}, but smsblock writes raw or vmdk only "
                         f"(name it .raw or .vmdk)")
    if fmt is None:
        return named or "raw"
    if named is not None and named != fmt:
        raise UsageError(f"{path}: the name says {named}, but {option} {fmt} was asked for "
                         f"(rename it, or drop {option})")
    return fmt


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
    doc = _rename_sizes(disk.info.to_dict())
    doc["disk_size"] = disk.size
    doc["allocated_bytes"] = disk.allocated_bytes()
    return doc


def _rename_sizes(doc: dict | None) -> dict | None:
    """DiskInfo's ``virtual_size`` is ``disk_size`` in every JSON output (one name)."""
    if doc is None:
        return None
    doc["disk_size"] = doc.pop("virtual_size", None)
    doc["parent"] = _rename_sizes(doc.get("parent"))
    return doc


def _info_lines(doc: dict) -> list[str]:
    rows = [("file", doc["path"]), ("format", doc["format"])]
    if doc.get("create_type"):
        rows.append(("create type", doc["create_type"]))
    rows.append(("virtual size", f"{human_size(doc['disk_size'])} ({doc['disk_size']} bytes)"))
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
        print_json(doc)
    else:
        print("\n".join(_info_lines(doc)))
    return 0


def cmd_convert(args) -> int:
    from ..disk.writer import convert, write_stream_optimized

    fmt = output_format(args.dst, args.output_format)
    if args.adapter_type and fmt != "vmdk":
        raise UsageError("--adapter-type applies to -O vmdk only")
    started = time.monotonic()
    with _open(args, args.src) as disk, \
            terminal_progress(f"convert {os.path.basename(args.src)} to {fmt}") as bar:
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
        print_json({"source": args.src, "output": args.dst, "format": fmt,
                    "create_type": "streamOptimized" if fmt == "vmdk" else None,
                    "disk_size": size, "file_size": st.st_size,
                    "allocated_bytes": on_disk, "seconds": round(seconds, 3)})
    else:
        kind = "streamOptimized VMDK" if fmt == "vmdk" else "sparse raw"
        print(f"{args.dst}: {kind}, {human_size(size)} virtual, {human_size(on_disk)} "
              f"on disk, {seconds:.2f} s")
    return 0
