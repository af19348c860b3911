"""The boot test: launch an image locally, watch its consoles, report how far it booted.

Stages, in order (see docs/image.md for what each means and its limits):

* ``bootloader``: the firmware handed over to the disk's boot code (SeaBIOS's "Booting
  from 0000:7c00" on its debug port) and that code read further sectors (QEMU's trace
  of the guest's disk reads): a boot loader loading its next stage; or a boot loader
  spoke on the serial console.  Boot code that reads nothing within
  ``BOOT_CODE_WAIT`` seconds of being run (zeros, a wiped MBR) ends the test;
* ``kernel``: the kernel's banner ("Linux version ...");
* ``root``: the root filesystem mounted (ext2/3/4, XFS, Btrfs messages, "VFS: Mounted
  root", systemd's sysroot.mount);
* ``init``: the root's init started (the kernel running /sbin/init, systemd, SysV init,
  OpenRC, BusyBox init);
* ``login``: a login prompt (``NAME login:``), or the operator's marker string instead.

A later stage implies the earlier ones (a kernel banner proves a boot loader ran).  The
``root`` stage counts only after the kernel's banner and ``init`` only after the root,
so an initramfs's own messages do not pass for them.  A failure message (firmware "Boot
failed", a GRUB error, "Kernel panic", an initramfs "ALERT!", emergency mode) ends the
test when no further stage follows within a few seconds; QEMU ending (``-no-reboot``
turns a reboot or panic into an exit) or the timeout end it too.  The instance is
always terminated; its console logs stay in the launch folder.
"""

from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..progress import check_cancel
from .catalog import Catalog
from .launch import Launches

DEFAULT_TIMEOUT = 300.0
MAX_TIMEOUT = 3600.0
BOOT_CODE_WAIT = 10.0        # seconds boot code may take to read its next stage
FAILURE_GRACE = 3.0          # seconds a failure message waits for a later stage to show up
POLL = 0.1
TAIL_LINES = 25
MAX_LINE = 1024              # a console line longer than this is cut (bounded memory)
MAX_MARKER = 200

LABELS = {
    "bootloader": "firmware handed over to the boot loader",
    "kernel": "kernel started",
    "root": "root filesystem mounted",
    "init": "init started",
    "login": "login prompt",
    "marker": "marker string",
}
# the stage whose being reached lets a stage's patterns count (see the module docstring)
NEEDS = {"root": "kernel", "init": "root", "login": "kernel", "marker": None}

PATTERNS = {
    "bootloader": [r"Booting `", r"GNU GRUB ",
                   r"\b(?:SYS|EXT|ISO|PXE)LINUX \d", r"Loading Linux ", r"Probing EDD"],
    "kernel": [r"Linux version \d+\.\d+"],
    "root": [r"EXT[234]-fs \([^)]+\): mounted filesystem", r"XFS \([^)]+\): Ending clean mount",
             r"XFS \([^)]+\): Mounting V\d", r"BTRFS info \(device [^)]+\)",
             r"VFS: Mounted root \(", r"Mounted (?:sysroot\.mount|/sysroot)",
             r"Reached target (?:Initrd Root File System|initrd-root-fs)"],
    "init": [r"Run (?!/init )\S+ as init process", r"Not activating Mandatory Access Control as",
             r"systemd\[1\]: ", r"Welcome to .*!", r"INIT: version", r"OpenRC .* is starting up",
             r"init started: BusyBox", r"Starting .*\.\.\.", r"Started .*\."],
    "login": [r"\S+ login: *$"],
}
FAILURES = [
    (r"Boot failed: .*", 0.5), (r"No bootable device", 0.5),
    (r"error: .*", FAILURE_GRACE), (r"grub rescue>", 0.5), (r"Press any key to continue", FAILURE_GRACE),
    (r"Kernel panic - not syncing.*", 1.0),
    (r"ALERT! .*", FAILURE_GRACE), (r"Dropping to a shell", FAILURE_GRACE),
    (r"You are in emergency mode", FAILURE_GRACE), (r"Give root password for maintenance", FAILURE_GRACE),
    (r"VFS: Unable to mount root fs.*", 1.0), (r"Gave up waiting for root", FAILURE_GRACE),
]
_HANDOVER = re.compile(r"Booting from [0-9A-Fa-f]{4}:7c00")
_DISK_READ = re.compile(r"blk_co_preadv .*\boffset (\d+) bytes (\d+)")
_COMPILED = {k: [re.compile(p) for p in v] for k, v in PATTERNS.items()}
_FAILURES = [(re.compile(p), g) for p, g in FAILURES]
_ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78cDEHM])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def expected_stages(os_family: str | None, marker: str | None) -> list[str]:
    """The stages a boot test expects of an image: a Windows guest writes nothing to the
    serial console unless EMS is on, so only the boot loader (and a marker) is checked."""
    last = ["marker"] if marker else ["login"]
    if os_family == "windows":
        return ["bootloader"] + (["marker"] if marker else [])
    return ["bootloader", "kernel", "root", "init"] + last


@dataclass
class Stage:
    name: str
    reached: bool = False
    at: float | None = None          # seconds since QEMU started
    line: str | None = None          # the console line that showed it

    def to_dict(self) -> dict:
        return {"name": self.name, "label": LABELS[self.name], "reached": self.reached,
                "seconds": None if self.at is None else round(self.at, 2), "line": self.line}


@dataclass
class BootTestResult:
    image_id: str
    instance_id: str
    ok: bool
    stages: list[Stage]
    stopped_at: str | None           # the first stage not reached
    reason: str
    elapsed: float
    accel: str
    console_log: str
    firmware_log: str
    last_lines: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"image_id": self.image_id, "instance_id": self.instance_id, "ok": self.ok,
                "stopped_at": self.stopped_at, "reason": self.reason,
                "elapsed": round(self.elapsed, 2), "accel": self.accel,
                "stages": [s.to_dict() for s in self.stages],
                "console_log": self.console_log, "firmware_log": self.firmware_log,
                "last_lines": self.last_lines}

    def summary(self) -> str:
        """One line for a run's status message or a log."""
        if self.ok:
            return f"boot test passed: {LABELS[self.stages[-1].name]} after {self.elapsed:.0f} s"
        return f"boot test failed at {LABELS[self.stopped_at]} ({self.stopped_at}): {self.reason}"

    def record(self) -> dict:
        """What the image record keeps of it."""
        return {"ok": self.ok, "stopped_at": self.stopped_at, "reason": self.reason,
                "tested": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "instance_id": self.instance_id, "elapsed": round(self.elapsed, 2),
                "stages": {s.name: s.reached for s in self.stages},
                "console_log": self.console_log, "last_lines": self.last_lines}


def clean(text: str) -> str:
    """A console line without terminal escapes and control characters."""
    return _CONTROL.sub("", _ESCAPES.sub("", text)).strip()


class ConsoleWatcher:
    """Feeds console text through the stage and failure patterns."""

    def __init__(self, stages: list[str], marker: str | None):
        self.stages = [Stage(name) for name in stages]
        self.marker = marker
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.partial = {"console": "", "firmware": "", "disk": ""}
        self.failure: tuple[str, float] | None = None     # (line, deadline)
        self.fatal = False
        self.around_failure: list[str] | None = None     # lines from just before the failure
        self.handover: tuple[str, float] | None = None    # firmware ran the boot code
        self.next_read: str | None = None                 # a read past the first sector

    def _reached(self, name: str) -> bool:
        return any(s.name == name and s.reached for s in self.stages)

    @property
    def last_lines(self) -> list[str]:
        """The console around the failure message, else its last lines."""
        if self.failure is not None and self.around_failure:
            return list(self.around_failure)
        return list(self.tail)

    @property
    def done(self) -> bool:
        return self.stages[-1].reached

    @property
    def stopped_at(self) -> str | None:
        return next((s.name for s in self.stages if not s.reached), None)

    def _match_stage(self, line: str, now: float, partial: bool) -> bool:
        for i, stage in enumerate(self.stages):
            if stage.reached:
                continue
            need = NEEDS.get(stage.name)
            if need and any(s.name == need for s in self.stages) and not self._reached(need):
                continue
            if stage.name == "marker":
                hit = self.marker in line
            elif partial and stage.name != "login":
                continue                              # only prompts come without a newline
            else:
                hit = any(p.search(line) for p in _COMPILED[stage.name])
            if hit:
                for earlier in self.stages[:i + 1]:   # a later stage implies the earlier ones
                    if not earlier.reached:
                        earlier.reached, earlier.at, earlier.line = True, now, line
                return True
        return False

    def feed(self, text: str, source: str, now: float) -> None:
        data = self.partial[source] + text
        lines = data.split("\n")
        self.partial[source] = lines.pop()[-MAX_LINE:]
        for raw in lines:
            self._line(clean(raw[:MAX_LINE]), source, now)
        prompt = clean(self.partial[source]) if source == "console" else ""
        if prompt:
            self._match_stage(prompt, now, partial=True)

    def _line(self, line: str, source: str, now: float) -> None:
        if not line:
            return
        if source == "disk":
            m = _DISK_READ.search(line)
            if m and int(m.group(1)) + int(m.group(2)) > 512 and self.next_read is None:
                self.next_read = f"the boot code read the disk at offset {m.group(1)}"
                self._boot_code_ran(now)
            return
        if source == "firmware" and _HANDOVER.search(line) and self.handover is None:
            self.handover = (line, now)
            self._boot_code_ran(now)
        shown = line if source == "console" else f"[firmware] {line}"
        self.tail.append(shown)
        if self.around_failure is not None and len(self.around_failure) < TAIL_LINES:
            self.around_failure.append(shown)
        if self._match_stage(line, now, partial=False):
            if not self.fatal:
                self.failure = None                   # progress after an error: not fatal
            return
        for pattern, grace in _FAILURES:
            if pattern.search(line):
                if self.failure is None:
                    self.failure = (line, now + grace)
                    self.around_failure = list(self.tail)[-5:]
                if pattern.pattern.startswith("Kernel panic"):
                    self.fatal = True
                return

    def _boot_code_ran(self, now: float) -> None:
        """The firmware ran the boot code and it read on: a boot loader is loading."""
        if self.handover and self.next_read and not self.stages[0].reached:
            stage = self.stages[0]
            stage.reached, stage.at = True, now
            stage.line = f"{self.handover[0]}; {self.next_read}"

    def failed(self, now: float) -> str | None:
        if self.failure is not None and now >= self.failure[1]:
            return self.failure[0]
        if self.handover and not self.stages[0].reached and now >= self.handover[1] + BOOT_CODE_WAIT:
            return (f"the firmware ran the disk's boot code but it read nothing more in "
                    f"{BOOT_CODE_WAIT:g} s (no boot loader in the MBR?)")
        return None


class _Follower:
    """Reads what a log file gained since the last call."""

    def __init__(self, path: str):
        self.path, self.pos = path, 0

    def read(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return ""
        self.pos += len(data)
        return data.decode("utf-8", errors="replace")


def boot_test(image_id: str, *, catalog=None, timeout: float = DEFAULT_TIMEOUT,
              marker: str | None = None, memory_mib: int = 512, disk_bus: str = "nvme",
              save: bool = True,
              cancel=None, progress=None) -> BootTestResult:
    """Launch ``image_id`` locally, watch it boot, terminate it; see the module docstring.

    ``save`` stores the result in the image's record (``boot_test``); ``progress`` is
    called with each :class:`Stage` as it is reached."""
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
        raise UsageError(f"boot test timeout {timeout!r} s is outside 0-{MAX_TIMEOUT:.0f}")
    if marker is not None and (not isinstance(marker, str) or not marker.strip()
                               or len(marker) > MAX_MARKER or "\n" in marker):
        raise UsageError(f"the boot marker must be one line of 1-{MAX_MARKER} characters")
    catalog = catalog if isinstance(catalog, Catalog) else Catalog(catalog)
    image = catalog.show(image_id)
    family = (image.get("os") or {}).get("family")
    watcher = ConsoleWatcher(expected_stages(family, marker), marker)
    launches = Launches(catalog)
    record = launches.launch(image_id, "local", memory_mib=memory_mib, disk_bus=disk_bus,
                             die_with_parent=True, trace_disk_reads=True)
    start = time.monotonic()
    reason = None
    try:
        console, firmware = _Follower(record["console_log"]), _Follower(record["firmware_log"])
        reads = _Follower(record["disk_reads_log"])
        reported = 0
        while True:
            now = time.monotonic() - start
            watcher.feed(firmware.read(), "firmware", now)
            if not watcher.stages[0].reached:      # only the boot code's reads matter
                watcher.feed(reads.read(), "disk", now)
            watcher.feed(console.read(), "console", now)
            reached = sum(s.reached for s in watcher.stages)
            if progress is not None:
                for s in watcher.stages[reported:reached]:
                    progress(s)
            reported = reached
            if watcher.done:
                break
            failure = watcher.failed(now)
            if failure:
                reason = f"the console shows: {failure}"
                break
            state = launches.show(record["instance_id"]).get("state")
            if state != "running":
                # read what QEMU wrote last before it ended
                watcher.feed(firmware.read() + "\n", "firmware", now)
                watcher.feed(console.read() + "\n", "console", now)
                if watcher.done:
                    break
                last = watcher.failure[0] if watcher.failure else None
                reason = "the machine stopped (QEMU ended)" + (f" after: {last}" if last else "")
                break
            if now >= timeout:
                reason = f"timed out after {timeout:g} s"
                break
            check_cancel(cancel)
            time.sleep(POLL)
    finally:
        elapsed = time.monotonic() - start
        launches.terminate(record["instance_id"])
    ok = watcher.done
    result = BootTestResult(
        image_id=image_id, instance_id=record["instance_id"], ok=ok, stages=watcher.stages,
        stopped_at=None if ok else watcher.stopped_at,
        reason="" if ok else (reason or "unknown"), elapsed=elapsed, accel=record["accel"],
        console_log=record["console_log"], firmware_log=record["firmware_log"],
        last_lines=watcher.last_lines)
    if save:
        catalog.set_boot_test(image_id, result.record())
    return result


def console_text(path: str | Path, limit: int = 1 << 20) -> str:
    """The end of a console log, cleaned, at most ``limit`` bytes of it."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - limit))
        data = f.read().decode("utf-8", errors="replace")
    return "\n".join(clean(line) for line in data.split("\n"))
