"""What the MBR's 440 bytes of boot code are: GRUB legacy, GRUB 2, Windows, other, none.

Recognised by the structure and strings each loader is built with, not by hashes of
particular builds, so any build of the same loader is recognised:

* GRUB legacy's stage1 jumps over its parameter block to 0x4A (``EB 48``) and carries its
  stage1 version 3.2 at offset 0x3E; GRUB 2's boot.img jumps to 0x65 (``EB 63``).  Both
  print "GRUB ", "Geom", "Hard Disk", "Read", " Error".
* Windows (2000 to 10) and MS-DOS MBRs print "Invalid partition table" and "Missing
  operating system"; NT 6 ones also probe the TPM ("TCPA").
"""

from __future__ import annotations

from dataclasses import dataclass

BOOT_CODE_SIZE = 440

GRUB_LEGACY = "grub-legacy"
GRUB2 = "grub2"
WINDOWS = "windows"
OTHER = "other"
NONE = "none"
KINDS = (GRUB_LEGACY, GRUB2, WINDOWS, OTHER, NONE)

_GRUB_STRINGS = (b"GRUB ", b"Geom", b"Hard Disk", b"Read", b" Error")
_WINDOWS_STRINGS = (b"Invalid partition table", b"Missing operating system")
# prologue of the Microsoft MBRs: xor ax,ax; mov ss,ax; mov sp,7C00h
_MS_PROLOGUE = b"\x33\xc0\x8e\xd0\xbc\x00\x7c"
_OTHER_NAMES = ((b"SYSLINUX", "SYSLINUX"), (b"LILO", "LILO"), (b"isolinux", "ISOLINUX"),
                (b"Multiple active partitions.", "SYSLINUX MBR"),
                (b"GRLDR", "GRUB4DOS"), (b"BOOTMGR", "Windows boot manager (VBR)"))


@dataclass(frozen=True, slots=True)
class BootCode:
    """``kind`` is one of :data:`KINDS`; ``detail`` names an "other" loader when known."""

    kind: str
    detail: str | None = None


def classify(sector0: bytes) -> BootCode:
    """Classify the boot code in the first 440 bytes of sector 0."""
    code = bytes(sector0[:BOOT_CODE_SIZE])
    if not code.strip(b"\0"):
        return BootCode(NONE)
    if all(s in code for s in _GRUB_STRINGS[:2]):
        if code[:2] == b"\xeb\x63":
            return BootCode(GRUB2)
        if code[:2] == b"\xeb\x48" and code[0x3E:0x40] == b"\x03\x02":
            return BootCode(GRUB_LEGACY)
        return BootCode(OTHER, "GRUB (unrecognised stage layout)")
    if all(s in code for s in _WINDOWS_STRINGS) or (
            code.startswith(_MS_PROLOGUE) and b"TCPA" in code):
        return BootCode(WINDOWS)
    for needle, name in _OTHER_NAMES:
        if needle in code:
            return BootCode(OTHER, name)
    return BootCode(OTHER)
