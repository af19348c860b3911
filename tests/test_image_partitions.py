"""Partition tables made by sfdisk: MBR primary/extended/logical, GPT, and damaged ones."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given, strategies as st

from image_builders import MiB, partition_disk, patch, sparse_file
from smsblock import open_disk
from smsblock.disk.base import Disk, DiskInfo
from smsblock.image.inspect import inspect_disk
from smsblock.image.partitions import read_partition_table

MBR_SCRIPT = """label: dos
label-id: 0x1234abcd
start=2048, size=8192, type=83, bootable
start=10240, size=4096, type=82
start=14336, size=40960, type=5
start=16384, size=4096, type=83
start=22528, size=4096, type=7
start=28672, size=8192, type=8e
"""

GPT_SCRIPT = """label: gpt
label-id: 01234567-89AB-CDEF-0123-456789ABCDEF
start=2048, size=4096, type=21686148-6449-6E6F-744E-656564454649, name="bios"
start=6144, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
start=14336, size=4096, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
"""


def codes(findings):
    return sorted(f.code for f in findings)


def table_of(path):
    with open_disk(path) as d:
        return read_partition_table(d)


def test_mbr_primary_extended_logical_match_sfdisk(tmp_path):
    disk = tmp_path / "mbr.img"
    sf = partition_disk(disk, 32 * MiB, MBR_SCRIPT)
    t = table_of(disk)
    assert t.kind == "mbr" and t.findings == [] and t.disk_id == "1234abcd"
    got = [(int(p.number), p.start // 512, p.size // 512, p.type, p.bootable, p.kind) for p in t.partitions]
    want = [(int(s["node"].rsplit("img", 1)[1]), s["start"], s["size"], f"0x{int(s['type'], 16):02x}",
             bool(s.get("bootable")), None) for s in sf]
    assert [g[:5] for g in got] == [w[:5] for w in want]
    assert [g[5] for g in got] == ["primary", "primary", "extended", "logical", "logical", "logical"]
    assert [p.number for p in t.partitions] == [1, 2, 3, 5, 6, 7]


def test_gpt_matches_sfdisk(tmp_path):
    disk = tmp_path / "gpt.img"
    sf = partition_disk(disk, 16 * MiB, GPT_SCRIPT)
    t = table_of(disk)
    assert t.kind == "gpt" and t.findings == []
    assert t.disk_id == "01234567-89ab-cdef-0123-456789abcdef"
    assert [(p.number, p.start // 512, p.size // 512, p.type, p.name) for p in t.partitions] == \
        [(i + 1, s["start"], s["size"], s["type"].lower(), s.get("name")) for i, s in enumerate(sf)]
    assert [p.uuid for p in t.partitions] == [s["uuid"].lower() for s in sf]


def _corrupt(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_gpt_primary_damaged_uses_backup(tmp_path):
    disk = tmp_path / "gpt.img"
    partition_disk(disk, 16 * MiB, GPT_SCRIPT)
    good = [(p.start, p.size, p.type) for p in table_of(disk).partitions]
    _corrupt(disk, 512 + 40)          # a field inside the primary header: CRC mismatch
    t = table_of(disk)
    assert t.kind == "gpt" and codes(t.findings) == ["gpt-primary-damaged"]
    assert "backup header at LBA 32767" in t.findings[0].message
    assert [(p.start, p.size, p.type) for p in t.partitions] == good


def test_gpt_primary_entries_damaged_uses_backup(tmp_path):
    disk = tmp_path / "gpt.img"
    partition_disk(disk, 16 * MiB, GPT_SCRIPT)
    _corrupt(disk, 1024 + 40)         # inside the primary entry array: its CRC fails
    t = table_of(disk)
    assert codes(t.findings) == ["gpt-primary-damaged"]
    assert "entry array CRC32" in t.findings[0].message
    assert len(t.partitions) == 3


def test_gpt_backup_damaged_is_a_warning(tmp_path):
    disk = tmp_path / "gpt.img"
    partition_disk(disk, 16 * MiB, GPT_SCRIPT)
    _corrupt(disk, 16 * MiB - 512 + 40)
    t = table_of(disk)
    assert codes(t.findings) == ["gpt-backup-damaged"] and len(t.partitions) == 3


def test_gpt_both_damaged_is_an_error(tmp_path):
    disk = tmp_path / "gpt.img"
    partition_disk(disk, 16 * MiB, GPT_SCRIPT)
    _corrupt(disk, 512 + 40)
    _corrupt(disk, 16 * MiB - 512 + 40)
    t = table_of(disk)
    assert t.kind == "gpt" and t.partitions == [] and codes(t.findings) == ["gpt-unreadable"]


def test_overlapping_partitions(tmp_path):
    disk = tmp_path / "mbr.img"
    partition_disk(disk, 32 * MiB, MBR_SCRIPT)
    patch(disk, 446 + 16 + 8, struct.pack("<I", 8000))   # partition 2 now starts inside 1
    t = table_of(disk)
    assert codes(t.findings) == ["partition-overlap"]
    assert "Partitions 1 and 2 overlap" in t.findings[0].message


def test_partition_past_end_of_disk(tmp_path):
    disk = tmp_path / "mbr.img"
    partition_disk(disk, 32 * MiB, MBR_SCRIPT)
    with open(disk, "r+b") as f:
        f.truncate(16 * MiB)     # the extended partition and logical 7 now run past the end
    with open_disk(disk) as d:
        report = inspect_disk(d)
    past = [f for f in report.findings if f.code == "partition-past-end"]
    assert [f.message.split()[1] for f in past] == ["3", "7"]
    assert report.partition_table == "mbr"
    # logical 7's EBR (sector 26624) is inside the file, so 7 is still listed


def test_extended_chain_loop(tmp_path):
    disk = tmp_path / "mbr.img"
    sf = partition_disk(disk, 32 * MiB, MBR_SCRIPT)
    ext_start = 14336
    # the third EBR's "next" entry points back to the first EBR
    ebrs = [ext_start] + [s["start"] - 2048 for s in sf[4:]]
    patch(disk, ebrs[2] * 512 + 446 + 16, bytes([0, 0, 0, 0, 5, 0, 0, 0]) +
          struct.pack("<II", 0, 2048))
    t = table_of(disk)
    assert "extended-loop" in codes(t.findings)
    assert [p.number for p in t.partitions] == [1, 2, 3, 5, 6, 7]


def test_ebr_pointing_outside_extended(tmp_path):
    disk = tmp_path / "mbr.img"
    partition_disk(disk, 32 * MiB, MBR_SCRIPT)
    patch(disk, 14336 * 512 + 446 + 16 + 8, struct.pack("<II", 1 << 20, 2048))
    t = table_of(disk)
    assert codes(t.findings) == ["ebr-out-of-bounds"]
    assert [p.number for p in t.partitions] == [1, 2, 3, 5]


def test_no_table_and_garbage_flags(tmp_path):
    disk = sparse_file(tmp_path / "blank.img", 1 * MiB)
    t = table_of(disk)
    assert t.kind == "none" and t.partitions == []
    patch(disk, 510, b"\x55\xaa")
    patch(disk, 446, b"\x17")          # boot flag neither 0x00 nor 0x80
    patch(disk, 446 + 4, b"\x83")
    t = table_of(disk)
    assert t.kind == "none" and codes(t.findings) == ["mbr-invalid"]


class BytesDisk(Disk):
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.path = "<bytes>"
        self.size = len(self.data)
        self.info = DiskInfo(self.path, "raw", self.size)

    def readinto(self, offset, buf):
        chunk = self.data[offset:offset + len(buf)]
        memoryview(buf)[:len(chunk)] = chunk
        return len(chunk)

    def extents(self, start=0, end=None):
        return iter(())


def _mbr_with_gpt(n_entries: int) -> bytearray:
    """A tiny disk with a protective MBR and a GPT whose CRCs are right."""
    size = 64 * 512
    data = bytearray(size)
    data[446 + 4] = 0xEE
    struct.pack_into("<II", data, 446 + 8, 1, size // 512 - 1)
    data[510:512] = b"\x55\xaa"
    entries = bytearray(n_entries * 128)
    hdr = bytearray(92)
    hdr[0:8] = b"EFI PART"
    struct.pack_into("<IIII", hdr, 8, 0x10000, 92, 0, 0)
    struct.pack_into("<QQQQ", hdr, 24, 1, size // 512 - 1, 34, size // 512 - 34)
    struct.pack_into("<QIII", hdr, 72, 2, n_entries, 128, zlib.crc32(entries))
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
    data[512:512 + 92] = hdr
    data[1024:1024 + len(entries)] = entries
    return data


@given(st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), min_size=1, max_size=40),
       st.sampled_from(["mbr", "gpt"]))
def test_random_damage_never_crashes(mutations, kind):
    """Random bytes in the table sectors become findings, never exceptions."""
    if kind == "mbr":
        data = bytearray(64 * 512)
        data[510:512] = b"\x55\xaa"
        for i, (t, start, count) in enumerate([(0x83, 1, 8), (0x05, 9, 40), (0x82, 50, 8)]):
            data[446 + 16 * i + 4] = t
            struct.pack_into("<II", data, 446 + 16 * i + 8, start, count)
        data[9 * 512 + 510:9 * 512 + 512] = b"\x55\xaa"
        data[9 * 512 + 446 + 4] = 0x83
        struct.pack_into("<II", data, 9 * 512 + 446 + 8, 1, 4)
    else:
        data = _mbr_with_gpt(4)
    for pos, value in mutations:
        data[pos % len(data)] = value
    report = inspect_disk(BytesDisk(data))
    assert report.partition_table in ("mbr", "gpt", "none")
    for p in report.partitions:
        assert p.size >= 0
    report.to_dict()


def test_hostile_gpt_with_32768_identical_partitions_is_bounded():
    """4 MiB of entries naming one range: n^2/2 overlapping pairs and 32768 filesystems to
    look into. The findings list a bounded number of overlaps and say what was skipped."""
    from smsblock.image.inspect import MAX_INSPECTED_PARTITIONS
    from smsblock.image.partitions import MAX_OVERLAP_FINDINGS
    n, first = 32768, 8200
    size = (first + 64) * 512
    data = bytearray(size)
    data[446 + 4] = 0xEE
    struct.pack_into("<II", data, 446 + 8, 1, size // 512 - 1)
    data[510:512] = b"\x55\xaa"
    entry = bytearray(128)
    entry[0:16] = bytes.fromhex("af3dc60f838472478e793d69d8477de4")      # Linux filesystem
    struct.pack_into("<QQ", entry, 32, first, first + 15)
    entries = bytes(entry) * n
    hdr = bytearray(92)
    hdr[0:8] = b"EFI PART"
    struct.pack_into("<IIII", hdr, 8, 0x10000, 92, 0, 0)
    struct.pack_into("<QQQQ", hdr, 24, 1, size // 512 - 1, 2 + n * 128 // 512, size // 512 - 34)
    struct.pack_into("<QIII", hdr, 72, 2, n, 128, zlib.crc32(entries))
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
    data[512:512 + 92] = hdr
    data[1024:1024 + len(entries)] = entries
    report = inspect_disk(BytesDisk(data))
    assert report.partition_table == "gpt" and len(report.partitions) == n
    assert {p.type_name for p in report.partitions} == {"Linux filesystem"}
    found = [f.code for f in report.findings]
    assert found.count("partition-overlap") == MAX_OVERLAP_FINDINGS + 1
    assert found.count("partitions-not-inspected") == 1 and len(found) < 40
    assert f"{n - MAX_INSPECTED_PARTITIONS} after the first" in \
        next(f.message for f in report.findings if f.code == "partitions-not-inspected")


def _gpt_4kn(n_sectors: int = 64) -> bytearray:
    """A 4Kn disk (4096-byte sectors) with a protective MBR, one partition (LBA 8-39) and
    both GPT headers, built from the UEFI layout: no tool here writes 4Kn tables to a file."""
    ss = 4096
    data = bytearray(n_sectors * ss)
    data[446 + 4] = 0xEE
    struct.pack_into("<II", data, 446 + 8, 1, n_sectors - 1)
    data[510:512] = b"\x55\xaa"
    entries = bytearray(32 * 128)                      # one sector of entries
    entries[0:16] = bytes.fromhex("af3dc60f838472478e793d69d8477de4")     # Linux filesystem
    entries[16:32] = bytes(range(16))
    struct.pack_into("<QQ", entries, 32, 8, 39)
    for lba, alt, entries_lba in ((1, n_sectors - 1, 2), (n_sectors - 1, 1, n_sectors - 2)):
        hdr = bytearray(92)
        hdr[0:8] = b"EFI PART"
        struct.pack_into("<IIII", hdr, 8, 0x10000, 92, 0, 0)
        struct.pack_into("<QQQQ", hdr, 24, lba, alt, 3, n_sectors - 3)
        hdr[56:72] = b"\x42" * 16
        struct.pack_into("<QIII", hdr, 72, entries_lba, 32, 128, zlib.crc32(entries))
        struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
        data[lba * ss:lba * ss + 92] = hdr
        data[entries_lba * ss:entries_lba * ss + len(entries)] = entries
    return data


def test_gpt_4kn_sectors_and_its_backup_header():
    data = _gpt_4kn()
    t = read_partition_table(BytesDisk(data))
    assert (t.kind, t.sector_size, t.findings) == ("gpt", 4096, [])
    assert [(p.start, p.size) for p in t.partitions] == [(8 * 4096, 32 * 4096)]
    data[4096 + 40] ^= 0xFF                            # the primary header's CRC fails
    t = read_partition_table(BytesDisk(data))
    assert (t.kind, t.sector_size, codes(t.findings)) == ("gpt", 4096, ["gpt-primary-damaged"])
    assert "backup header at LBA 63" in t.findings[0].message
    assert [(p.start, p.size) for p in t.partitions] == [(8 * 4096, 32 * 4096)]
    data[4096:4096 + 8] = bytes(8)                     # no signature at 4096 either
    t = read_partition_table(BytesDisk(data))
    assert (t.sector_size, codes(t.findings)) == (4096, ["gpt-primary-damaged"])
    data[63 * 4096 + 40] ^= 0xFF                       # and the backup fails too
    t = read_partition_table(BytesDisk(data))
    assert (t.partitions, codes(t.findings)) == ([], ["gpt-unreadable"])
