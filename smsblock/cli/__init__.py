"""``smsblock``: the command line.

Each area keeps its subcommands in its own module with a ``register(subparsers)``
function; this module wires them up and turns every :class:`SmsBlockError` (and OS
error) into one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from .. import __version__
from ..errors import SmsBlockError

# Areas of the CLI, in help order.  A module that is not there yet is skipped.
COMMAND_MODULES = ["disk_cmds", "scan_cmds", "engine_cmds", "image_cmds", "service_cmds", "aws_cmds", "demo"]


#: version of the JSON documents smsblock's own commands print (``"schema"`` key); raised
#: when a key changes meaning or goes away (new keys do not raise it)
JSON_SCHEMA = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake gives one line (``smsblock: error: ...``) and exit status 2
    instead of the usage block; ``--help`` still shows the usage."""

    def error(self, message):
        self.exit(2, f"smsblock: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="smsblock",
        description="Replicate VM disks block by block, incrementally, and turn runs into machine images.")
    parser.add_argument("--version", action="version", version=f"smsblock {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="smsblock: %(levelname)s: %(message)s")
    try:
        status = args.func(args)
    except SmsBlockError as e:
        print(f"smsblock: error: {e}", file=sys.stderr)
        return e.exit_status
    except ModuleNotFoundError as e:     # an optional extra that is not installed
        extra = {"boto3": "cloud", "botocore": "cloud", "pyVmomi": "vsphere", "requests": "vsphere",
                 "pyfsext": "image", "pyfsxfs": "image", "pyfsntfs": "image", "pyregf": "image"}
        hint = f" (pip install 'smsblock[{extra[e.name]}]')" if e.name in extra else ""
        print(f"smsblock: error: this command needs the Python package {e.name!r}{hint}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("smsblock: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"smsblock: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return int(status or 0)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def print_json(doc, schema: bool = True) -> None:
    """The one JSON style of every command: indented by 2, keys sorted, UTF-8 as is.
    smsblock's own documents (objects) carry ``"schema": JSON_SCHEMA``; ``schema=False``
    is for documents whose shape belongs to someone else (the AWS SMS responses)."""
    if schema and isinstance(doc, dict):
        doc = {"schema": JSON_SCHEMA, **doc}
    print(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, default=str))


STORE_ENV = "SMSBLOCK_STORE"


def add_store_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--store``, defaulting to $SMSBLOCK_STORE; required when that is not set."""
    default = os.environ.get(STORE_ENV) or None
    parser.add_argument("--store", default=default, required=default is None,
                        metavar="STORE", help=(help or "store: a directory, s3://BUCKET/PREFIX or "
                                               "ebs://[REGION]") + f" (default: ${STORE_ENV})")


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not octal permission bits (e.g. 640)")
    return mode


def add_mode_flag(parser: argparse.ArgumentParser) -> None:
    """``--mode OCTAL``: the output file's permission bits (default: private, 0600)."""
    parser.add_argument("--mode", type=_file_mode, metavar="OCTAL", default=None,
                        help="permission bits of the output file, e.g. 640 (default 600: "
                             "only you can read it)")
