"""``smsblock inspect`` and ``smsblock image create|list|show|delete|launch|launches|terminate|
boot-test``."""

from __future__ import annotations

import os
import sys

from ..errors import ImageValidationError, UsageError
from ..progress import terminal_progress
from . import STORE_ENV, add_json_flag, add_store_option, print_json
from .disk_cmds import human_size


def _print_json(doc) -> None:
    print_json(doc)


def _record_json(record: dict) -> dict:
    """An image record as the CLI prints it: the disk's size under ``disk_size``, the name
    every other command uses (the catalog file keeps what it holds)."""
    disk = record.get("disk")
    if isinstance(disk, dict) and "virtual_size" in disk:
        disk = dict(disk)
        disk["disk_size"] = disk.pop("virtual_size")
        record = {**record, "disk": disk}
    return record


def _add_rules_options(p) -> None:
    p.add_argument("--allow-unsupported", action="store_true",
                   help="report an OS off the supported list as a warning, not an error")
    p.add_argument("--rules", metavar="FILE",
                   help="a supported-OS list (JSON) replacing the bundled one")


def _add_run_options(p, required: bool) -> None:
    if required:
        add_store_option(p, "store path or URL")
    else:   # inspect: DISK or --store; $SMSBLOCK_STORE applies when DISK is not given
        p.add_argument("--store", metavar="STORE",
                       help=f"store path or URL (default without DISK: ${STORE_ENV})")
    p.add_argument("--server", required=required, help="server id")
    p.add_argument("--run", help="run id (default: the latest)")


def register(sub) -> None:
    p = sub.add_parser(
        "inspect", help="describe a disk's partitions, filesystems, boot code and OS, and validate it",
        description="Read a disk's partition table (MBR or GPT), identify each partition's "
                    "filesystem, the MBR boot code and the operating system, and check them "
                    "against the image rules. Give a disk image, or --store/--server[/--run] "
                    "to inspect a replicated run without restoring it.")
    p.add_argument("disk", nargs="?", metavar="DISK", help="a raw image or a VMDK")
    _add_run_options(p, required=False)
    p.add_argument("-f", "--format", dest="src_format", metavar="FMT",
                   help="the disk's format, raw or vmdk (detected by default)")
    _add_rules_options(p)
    add_json_flag(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("image", help="create and manage machine images from runs")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    c = isub.add_parser(
        "create", help="validate a run and register it as an image",
        description="Reconstruct a run's disk from the store while streaming it, validate it "
                    "(refusing with the findings unless --force), and register an image: in "
                    "the local catalog (a streamOptimized VMDK plus a JSON record), or in EC2.")
    _add_run_options(c, required=True)
    c.add_argument("--target", choices=["local", "ec2"], default="local",
                   help="local catalog (default) or ec2 (EBS snapshot + RegisterImage)")
    c.add_argument("--catalog", metavar="DIR",
                   help="local catalog folder (default: $SMSBLOCK_CATALOG or "
                        "~/.local/share/smsblock/images)")
    c.add_argument("--force", action="store_true", help="register even when validation finds errors")
    c.add_argument("--license-type", choices=["Auto", "AWS", "BYOL"], default="Auto",
                   help="Auto: BYOL for Linux, AWS for Windows (default)")
    c.add_argument("--name", help="image name (default: SERVER-RUN)")
    c.add_argument("--description", help="image description")
    c.add_argument("--endpoint-url", help="EC2/EBS endpoint for --target ec2 (default: AWS's)")
    c.add_argument("--region", help="AWS region for --target ec2 (default: the AWS configuration's)")
    _add_rules_options(c)
    add_json_flag(c)
    c.set_defaults(func=cmd_image_create)

    for name, helptext, func in (("list", "list the catalog's images", cmd_image_list),
                                 ("show", "show one image's record", cmd_image_show),
                                 ("delete", "delete an image and its disk", cmd_image_delete)):
        q = isub.add_parser(name, help=helptext)
        if name != "list":
            q.add_argument("image_id", metavar="IMAGE_ID")
        q.add_argument("--catalog", metavar="DIR", help="local catalog folder")
        if name != "delete":
            add_json_flag(q)
        q.set_defaults(func=func)

    _register_launch(isub)


def _register_launch(isub) -> None:
    from ..image.boottest import DEFAULT_TIMEOUT
    from ..image.launch import DEFAULT_INSTANCE_TYPE, DEFAULT_MEMORY_MIB, DISK_BUSES

    def local_options(q):
        q.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, metavar="MIB",
                       help=f"guest memory for a local launch (default {DEFAULT_MEMORY_MIB})")
        q.add_argument("--disk-bus", choices=DISK_BUSES, default="nvme",
                       help="how the disk is attached locally: nvme as on EC2 Nitro (default), "
                            "virtio or ide")

    q = isub.add_parser(
        "launch", help="start an instance of an image (QEMU here, or EC2)",
        description="local: boot the catalog image's disk under QEMU through a copy-on-write "
                    "overlay (the image is never modified), serial console to a log; KVM when "
                    "usable, software emulation otherwise. ec2: RunInstances with the AMI.")
    q.add_argument("image_id", metavar="IMAGE_ID")
    q.add_argument("--target", choices=["local", "ec2"], default="local",
                   help="local QEMU (default) or ec2 (RunInstances)")
    q.add_argument("--catalog", metavar="DIR", help="local catalog folder")
    local_options(q)
    q.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE,
                   help=f"EC2 instance type (default {DEFAULT_INSTANCE_TYPE})")
    q.add_argument("--endpoint-url", help="EC2 endpoint for --target ec2 (default: AWS's)")
    q.add_argument("--region", help="AWS region for --target ec2")
    add_json_flag(q)
    q.set_defaults(func=cmd_image_launch)

    q = isub.add_parser("launches", help="list launched instances")
    q.add_argument("--catalog", metavar="DIR", help="local catalog folder")
    add_json_flag(q)
    q.set_defaults(func=cmd_image_launches)

    q = isub.add_parser("terminate", help="stop a launched instance and remove its overlay")
    q.add_argument("instance_id", metavar="INSTANCE_ID")
    q.add_argument("--catalog", metavar="DIR", help="local catalog folder")
    add_json_flag(q)
    q.set_defaults(func=cmd_image_terminate)

    q = isub.add_parser(
        "boot-test", help="boot an image locally and report how far it gets",
        description="Launch the image under QEMU, watch the firmware and serial consoles for "
                    "the stages boot loader, kernel, root filesystem, init and login prompt (or "
                    "--marker), then terminate it. Exit status 0 only when the last stage was "
                    "reached; the result is stored in the image's record.")
    q.add_argument("image_id", metavar="IMAGE_ID")
    q.add_argument("--catalog", metavar="DIR", help="local catalog folder")
    q.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"give up after S seconds (default {DEFAULT_TIMEOUT:g})")
    q.add_argument("--marker", metavar="TEXT",
                   help="a console string that ends the test instead of the login prompt")
    local_options(q)
    add_json_flag(q)
    q.set_defaults(func=cmd_image_boot_test)


def _rules(args):
    from ..image.rules import load_rules
    return load_rules(args.rules)


def cmd_inspect(args) -> int:
    from ..image.validate import inspect_and_validate

    if args.disk is None and args.store is None:
        args.store = os.environ.get(STORE_ENV) or None
    if (args.disk is None) == (args.store is None):
        raise UsageError("inspect needs either DISK or --store with --server (not both)")
    rules = _rules(args)
    if args.disk is not None:
        if args.server or args.run:
            raise UsageError("--server and --run go with --store, not with DISK")
        from ..disk import open_disk
        disk, source = open_disk(args.disk, format=args.src_format), args.disk
    else:
        if not args.server:
            raise UsageError("--store needs --server")
        from ..store import open_store
        store = open_store(args.store)
        store.require()
        disk = store.run_disk(args.server, args.run)
        run_id = getattr(disk, "manifest", None) and disk.manifest.meta.get("run_id")
        source = f"{store.url}#{args.server}/{run_id or args.run or 'latest'}"
    with disk:
        report = inspect_and_validate(disk, rules=rules, allow_unsupported=args.allow_unsupported,
                                      source=source)
    if args.json:
        _print_json(report.to_dict())
    else:
        _print_report(report)
    return 0 if report.ok else 1


def _print_report(report) -> None:
    print(f"disk: {report.source} ({human_size(report.disk_size)})")
    print(f"partition table: {report.partition_table}"
          + (f" (id {report.disk_id})" if report.disk_id else ""))
    code = report.boot_code + (f" ({report.boot_code_detail})" if report.boot_code_detail else "")
    print(f"boot code: {code}")
    if report.partitions:
        print(f"  {'#':>2} {'start':>12} {'size':>10}  {'type':<38} {'boot':<4} {'fs':<6} label / uuid")
        for p in report.partitions:
            ptype = p.type or "-"
            if p.type_name:
                ptype = f"{ptype} {p.type_name}"
            print(f"  {p.number:>2} {p.start:>12} {human_size(p.size):>10}  {ptype[:38]:<38} "
                  f"{'*' if p.bootable else '':<4} {p.filesystem or '-':<6} "
                  f"{p.label or '-'} / {p.uuid or '-'}")
    o = report.os
    if o:
        print(f"os: {o.family} {o.distribution or '?'} {o.version or '?'} "
              f"({o.architecture or 'unknown architecture'}) on partition {o.root_partition}")
    else:
        print("os: not found")
    for f in report.findings:
        print(f"{f.severity}: {f.code}: {f.message}")
    print("OK: the disk can be imported" if report.ok else "NOT OK: the disk cannot be imported as is")


def _catalog(args):
    from ..image.catalog import Catalog
    return Catalog(args.catalog)


def cmd_image_create(args) -> int:
    from ..image.register import create_image
    from ..store import open_store

    open_store(args.store).require()     # a mistyped path says so, not "no runs"
    try:
        with terminal_progress(f"image {args.server}") as bar:
            record = create_image(args.store, args.server, args.run, target=args.target,
                                  catalog=_catalog(args), force=args.force,
                                  allow_unsupported=args.allow_unsupported,
                                  license_type=args.license_type, name=args.name,
                                  description=args.description, rules=_rules(args),
                                  endpoint_url=args.endpoint_url, region=args.region,
                                  progress=bar)
    except ImageValidationError as e:
        if args.json:
            _print_json({"ok": False, "error": str(e), "findings": [f.to_dict() for f in e.findings]})
        else:
            for f in e.findings:
                print(f"{f.severity}: {f.code}: {f.message}", file=sys.stderr)
        raise ImageValidationError(f"{e} (use --force to register it anyway)", e.findings) from None
    if args.json:
        _print_json(_record_json(record))
    else:
        o = record.get("os") or {}
        if record.get("ec2"):
            print(f"snapshot {record['ec2']['snapshot_id']} ({record['ec2']['blocks_sent']} blocks sent)")
        print(f"{record['image_id']}: {record['name']} ({o.get('distribution') or 'unknown OS'} "
              f"{o.get('version') or ''}, {record['architecture']}, {record['license_type']}"
              f"{', forced' if record['forced'] else ''})")
    return 0


def cmd_image_list(args) -> int:
    catalog = _catalog(args)
    records = catalog.list()
    if args.json:
        _print_json({"catalog": str(catalog.root),
                     "images": [{k: r.get(k) for k in ("image_id", "name", "created", "source",
                                                        "os", "architecture", "license_type",
                                                        "ok", "forced", "boot_test")}
                                for r in records]})
        return 0
    if not records:
        print(f"no images in the catalog {catalog.root}")
    for r in records:
        o = r.get("os") or {}
        src = r.get("source") or {}
        print(f"{r['image_id']}  {r.get('created', '')}  {r.get('name', '')}  "
              f"{o.get('distribution') or '-'} {o.get('version') or ''}  "
              f"{src.get('server_id')}/{src.get('run_id')}")
    return 0


def cmd_image_show(args) -> int:
    record = _catalog(args).show(args.image_id)
    if args.json:
        _print_json(_record_json(record))
    else:
        for key in ("image_id", "name", "description", "created", "target", "architecture",
                    "boot_mode", "root_device_name", "license_type", "ok", "forced", "disk_path"):
            print(f"{key}: {record.get(key)}")
        src = record.get("source") or {}
        print(f"source: {src.get('store')} server {src.get('server_id')} run {src.get('run_id')}")
        o = record.get("os") or {}
        print(f"os: {o.get('family')} {o.get('distribution')} {o.get('version')}")
        for f in record.get("findings", []):
            print(f"{f['severity']}: {f['code']}: {f['message']}")
        bt = record.get("boot_test")
        if bt:
            print(f"boot test: {'passed' if bt.get('ok') else 'FAILED at ' + str(bt.get('stopped_at'))}"
                  f" ({bt.get('tested')}){': ' + bt['reason'] if bt.get('reason') else ''}")
    return 0


def cmd_image_delete(args) -> int:
    _catalog(args).delete(args.image_id)
    print(f"deleted {args.image_id}")
    return 0


def _launch_line(r: dict) -> str:
    where = f"{r.get('accel')}, {r.get('disk_bus')}" if r.get("target") == "local" \
        else r.get("region") or "ec2"
    return (f"{r['instance_id']}  {r.get('state')}  {r.get('image_id')}  {r.get('target')} "
            f"({where})  {r.get('launched', '')}")


def cmd_image_launch(args) -> int:
    from ..image.launch import launch_image

    record = launch_image(args.image_id, args.target, catalog=args.catalog,
                          memory_mib=args.memory, disk_bus=args.disk_bus,
                          instance_type=args.instance_type, endpoint_url=args.endpoint_url,
                          region=args.region)
    if args.json:
        _print_json(record)
    else:
        print(_launch_line(record))
        if record.get("console_log"):
            print(f"console: {record['console_log']}")
    return 0


def cmd_image_launches(args) -> int:
    from ..image.launch import list_launches

    records = list_launches(args.catalog)
    if args.json:
        _print_json({"catalog": str(_catalog(args).root), "launches": records})
    elif not records:
        print(f"no launches in the catalog {_catalog(args).root}")
    else:
        for r in records:
            print(_launch_line(r))
    return 0


def cmd_image_terminate(args) -> int:
    from ..image.launch import terminate_instance

    record = terminate_instance(args.instance_id, catalog=args.catalog)
    if args.json:
        _print_json(record)
    else:
        print(_launch_line(record))
    return 0


def cmd_image_boot_test(args) -> int:
    from ..image.boottest import LABELS, boot_test

    def show(stage):
        if not args.json:
            print(f"  {stage.at:7.1f} s  {LABELS[stage.name]}: {stage.line}", flush=True)

    if not args.json:
        print(f"boot test of {args.image_id} (timeout {args.timeout:g} s)", flush=True)
    result = boot_test(args.image_id, catalog=args.catalog, timeout=args.timeout,
                       marker=args.marker, memory_mib=args.memory, disk_bus=args.disk_bus,
                       progress=show)
    if args.json:
        from ..image.boottest import console_text
        doc = result.to_dict()
        try:      # the console itself, cleaned of terminal escapes (its last 64 KiB)
            doc["console"] = console_text(result.console_log, 64 << 10)
        except OSError:
            doc["console"] = None
        _print_json(doc)
        return 0 if result.ok else 1
    if result.ok:
        print(f"PASSED: {result.summary()} ({result.accel})")
        return 0
    for stage in result.stages:
        if not stage.reached:
            print(f"  {'-':>7}    {LABELS[stage.name]}: not reached")
    print(f"FAILED at {LABELS[result.stopped_at]}: {result.reason}")
    print("console:")
    for line in result.last_lines:
        print(f"  | {line}")
    print(f"console log: {result.console_log}")
    return 1
