"""The local image catalog: each image a streamOptimized VMDK plus a JSON record.

Layout: ``CATALOG/ami-<17 hex>/disk.vmdk`` and ``image.json``.  An image is built in a
hidden temporary folder and renamed into place only when both files are complete, so
the catalog never lists a half-written image; a crash leaves only a ``.tmp-*`` folder
that :meth:`Catalog.add` of a later image ignores.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

from ..errors import ImageError, ImageNotFoundError, UsageError
from ..fsutil import DIR_MODE, LINK_REFUSED, fsync_dir, is_link, make_root, replace_file, write_new_file

IMAGE_ID = re.compile(r"ami-[0-9a-f]{17}")   # always fullmatch
RECORD_FILE = "image.json"
DISK_FILE = "disk.vmdk"


def default_catalog_dir() -> Path:
    """``$SMSBLOCK_CATALOG``, else ``~/.local/share/smsblock/images``."""
    env = os.environ.get("SMSBLOCK_CATALOG")
    if env:
        return Path(env)
    return Path.home() / ".local" / "share" / "smsblock" / "images"


def new_image_id() -> str:
    """``ami-`` followed by 17 random hex digits (EC2's long id format)."""
    return "ami-" + secrets.token_hex(9)[:17]


def check_image_id(image_id: str) -> str:
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        raise UsageError(f"{image_id!r} is not an image id (ami- followed by 17 hex digits)")
    return image_id


class Catalog:
    """A folder of images; see the module docstring."""

    def __init__(self, root=None):
        self.root = Path(root) if root is not None else default_catalog_dir()

    def _dir(self, image_id: str) -> Path:
        return self.root / check_image_id(image_id)

    def add(self, write_disk, record: dict) -> dict:
        """Create an image: ``write_disk(path)`` writes the VMDK, ``record`` is completed
        with ``image_id`` and the disk file's name and size, then saved; returns it."""
        make_root(self.root)                # 0700
        image_id = new_image_id()
        while os.path.lexists(self.root / image_id):
            image_id = new_image_id()
        tmp = self.root / f".tmp-{image_id}"
        os.mkdir(tmp, DIR_MODE)             # new: never an existing folder or link
        try:
            disk_path = tmp / DISK_FILE
            write_disk(disk_path)
            record = dict(record, image_id=image_id,
                          disk={"file": DISK_FILE, "format": "vmdk", "create_type": "streamOptimized",
                                "file_size": disk_path.stat().st_size,
                                **(record.get("disk") or {})})
            data = json.dumps(record, indent=2, sort_keys=True) + "\n"
            write_new_file(tmp / RECORD_FILE, data.encode())     # 0600, O_EXCL
            os.rename(tmp, self.root / image_id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        return record

    def list(self) -> list[dict]:
        """Every image's record, oldest first."""
        out = []
        if not self.root.is_dir():
            return out
        for entry in sorted(self.root.iterdir()):
            if IMAGE_ID.fullmatch(entry.name) and (entry / RECORD_FILE).is_file():
                try:
                    out.append(self.show(entry.name))
                except ImageError:
                    continue
        return sorted(out, key=lambda r: (r.get("created", ""), r["image_id"]))

    def show(self, image_id: str) -> dict:
        path = self._dir(image_id) / RECORD_FILE
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise ImageNotFoundError(f"no image {image_id} in the catalog at {self.root}") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ImageError(f"{path}: unreadable image record ({e})") from None
        if not isinstance(record, dict) or record.get("image_id") != image_id:
            raise ImageError(f"{path}: the record does not describe image {image_id}")
        record["disk_path"] = str(self._dir(image_id) / record.get("disk", {}).get("file", DISK_FILE))
        return record

    def delete(self, image_id: str) -> None:
        d = self._dir(image_id)
        if is_link(d):      # never delete what a planted link points to
            raise ImageError(f"{d}: {LINK_REFUSED}")
        if not (d / RECORD_FILE).is_file():
            raise ImageNotFoundError(f"no image {image_id} in the catalog at {self.root}")
        # rename first so a crash midway never leaves a listed image without its disk
        trash = self.root / f".tmp-del-{image_id}"
        os.rename(d, trash)
        shutil.rmtree(trash)

    def set_boot_test(self, image_id: str, result: dict) -> dict:
        """Store a boot test's outcome in the image's record (``boot_test``); a failed test
        marks the image (``boot_test.ok`` false) and never deletes it."""
        d = self._dir(image_id)
        record = self.show(image_id)
        record.pop("disk_path", None)
        record["boot_test"] = result
        # atomic: readers see the old record or the new one
        replace_file(d / RECORD_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
        return record
