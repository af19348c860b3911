"""A connector source whose VM list comes through a FIFO: ``list_vms()`` blocks in
``open()`` until someone writes the list (JSON) into it, so a catalog import from it takes
exactly as long as the test wants - a source that is slow for real, across processes,
with nothing of the code under test mocked.

``python -m fifo_source serve ...`` (with tests/ on sys.path) is ``smsblock serve ...``
with this source kind registered.
"""

from __future__ import annotations

import errno
import json
import os
import time

from smsblock.service.sources import register_source_kind
from smsblock.source import VmRecord

KIND = "test-fifo"
MANAGER_ID = "fifo-manager-0001"


class FifoSource:
    manager_type = "VSPHERE"
    manager_name = "fifo"
    manager_id = MANAGER_ID

    def __init__(self, config: dict):
        self.path = config["fifo"]

    def config(self) -> dict:
        return {"fifo": self.path}

    def list_vms(self) -> list[VmRecord]:
        with open(self.path) as f:          # blocks until a writer opens the FIFO
            names = json.load(f)
        return [VmRecord(vmId=n, vmName=n, vmPath=f"/Datacenters/DC/vm/{n}", vmManagerName="fifo",
                         vmManagerId=MANAGER_ID, vmManagerType="VSPHERE") for n in names]

    def close(self) -> None:
        pass


def register() -> None:
    register_source_kind(KIND, FifoSource)


def feed(path, names: list[str], timeout: float = 10.0) -> bool:
    """Write the VM list into the FIFO once a reader waits on it; False if none came."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:   # ENXIO: no reader yet
                return False
            time.sleep(0.02)
            continue
        try:
            os.set_blocking(fd, True)
            os.write(fd, json.dumps(names).encode())
        finally:
            os.close(fd)
        return True


register()

if __name__ == "__main__":
    import sys

    from smsblock.cli import main
    sys.exit(main())
