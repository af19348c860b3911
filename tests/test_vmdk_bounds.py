"""Disk input stays bounded in memory and time whatever its shape.

One sparse file named by many extent lines or chain links, pathological descriptor text,
absurd sizes, deltas without parentCID or without a descriptorOffset.  The shapes that
could eat memory or time run in a subprocess under RLIMIT_AS and a timeout, so that a
regression fails the test instead of taking the test runner down.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import smsblock
from smsblock.disk import sparse as sparse_mod
from smsblock.disk.vmdk import open_vmdk
from smsblock.errors import CidMismatchError, CorruptHeaderError, DescriptorError, DiskFormatError
from conftest import qemu_img
from vmdk_images import make_child, oracle_raw, qemu_convert, qemu_io, write_raw

KiB, MiB = 1 << 10, 1 << 20
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
ROOT = Path(__file__).resolve().parent.parent
#: address space the worker may use: the interpreter, numpy and smsblock take ~150 MiB of
#: it, a disk's grain-table cache at most 128 MiB; 16 caches of 64 MiB (one per extent line
#: or chain link, as before) do not fit
WORKER_AS_BYTES = 768 * MiB
WORKER_TIMEOUT_S = 120


# --- shapes ---------------------------------------------------------------------------

def hostile_sparse(n_tables: int = 8192, gtes: int = 4096, grain: int = 8,
                   capacity: int | None = None) -> bytes:
    """A ~50 KB KDMV file whose directory names one 16 KiB grain table ``n_tables`` times.

    Read whole, each directory entry is a table to load: 8192 of them fill a 128 MiB cache.
    """
    gd_at = 1
    gd_sectors = -(-n_tables * 4 // 512)
    gt_at = gd_at + gd_sectors
    grain_at = gt_at + gtes * 4 // 512
    if capacity is None:
        capacity = n_tables * gtes * grain
    header = HEADER.pack(b"KDMV", 1, 1, capacity, grain, 0, 0, gtes, 0, gd_at, grain_at, 0,
                         b"\n \r\n", 0).ljust(512, b"\0")
    gd = struct.pack(f"<{n_tables}I", *([gt_at] * n_tables)).ljust(gd_sectors * 512, b"\0")
    gt = struct.pack("<I", grain_at).ljust(gtes * 4, b"\0")
    return header + gd + gt + b"\x5a" * (grain * 512)


def descriptor(lines: list[str], cid: int = 1, parent_cid: int | None = 0xFFFFFFFF,
               hint: str | None = None, extra: str = "") -> str:
    text = f"# Disk DescriptorFile\nversion=1\nCID={cid:08x}\n"
    if parent_cid is not None:
        text += f"parentCID={parent_cid:08x}\n"
    text += 'createType="twoGbMaxExtentSparse"\n'
    if hint is not None:
        text += f'parentFileNameHint="{hint}"\n'
    return text + "\n".join(lines) + "\n" + extra


def repeated(folder: Path, times: int, n_tables: int = 8192) -> Path:
    """One sparse file named by ``times`` extent lines of one descriptor."""
    (folder / "h.vmdk").write_bytes(hostile_sparse(n_tables))
    sectors = n_tables * 4096 * 8
    p = folder / "rep.vmdk"
    p.write_text(descriptor([f'RW {sectors} SPARSE "h.vmdk"'] * times))
    return p


def chain(folder: Path, depth: int, n_tables: int = 8192, distinct: bool = False) -> Path:
    """``depth`` chain links (descriptors), naming the same sparse file or one copy each."""
    hostile = hostile_sparse(n_tables)
    sectors = n_tables * 4096 * 8
    for i in range(depth):
        last = i == depth - 1
        extent = f"h{i}.vmdk" if distinct else "h.vmdk"
        (folder / extent).write_bytes(hostile)
        (folder / f"c{i}.vmdk").write_text(descriptor(
            [f'RW {sectors} SPARSE "{extent}"'], cid=i + 1,
            parent_cid=0xFFFFFFFF if last else i + 2, hint=None if last else f"c{i + 1}.vmdk"))
    return folder / "c0.vmdk"


def repeated_flat(folder: Path, times: int) -> Path:
    """One flat file named by ``times`` extent lines (each line once took a descriptor)."""
    (folder / "f-flat.vmdk").write_bytes(b"\x42" * 4096)
    p = folder / "flat.vmdk"
    p.write_text(descriptor(['RW 8 FLAT "f-flat.vmdk" 0'] * times))
    return p


# --- the worker: opens and reads under limits, says what happened ------------------------

WORKER = r"""
import json, resource, sys, time, itertools
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from smsblock.disk.vmdk import open_vmdk
from smsblock.errors import DiskFormatError

def touch(d):
    d.info.to_dict()
    for e in itertools.islice(d.extents(), 2000):
        d.read(e.offset, min(e.length, 65536))
    # one read per grain table span (16 MiB here), of a grain no table allocates (the
    # middle of the span): every table of every part and every chain link gets loaded
    for off in range(8 << 20, min(d.size, 1 << 40), 16 << 20):
        d.read(off, 512)

results = []
for path in sys.argv[2:]:
    t = time.monotonic()
    try:
        with open_vmdk(path) as d:
            touch(d)
        r = {"ok": True}
    except DiskFormatError as e:
        r = {"ok": False, "cls": type(e).__name__, "path": e.path, "offset": e.offset,
             "msg": str(e)}
    except BaseException as e:
        r = {"ok": False, "cls": type(e).__name__, "crash": True, "msg": repr(e)[:300]}
    r["path_arg"] = path
    r["seconds"] = time.monotonic() - t
    results.append(r)
print(json.dumps(results))
"""


def run_limited(paths: list[Path], limit: int = WORKER_AS_BYTES,
                timeout: float = WORKER_TIMEOUT_S) -> list[dict]:
    # one BLAS thread and few malloc arenas: the address space is then about the reader's
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(limit), *map(str, paths)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def assert_clean(result: dict, max_seconds: float = 10) -> None:
    """Read, or refused with a DiskFormatError naming a file and an offset; in time."""
    assert not result.get("crash"), result
    if not result["ok"]:
        assert "out of memory" not in result["msg"], result
        assert result["path"] and result["offset"] is not None, result
        assert f"offset {result['offset']}" in result["msg"], result
    assert result["seconds"] < max_seconds, result


# --- memory: one file, one cache ---------------------------------------------------------

def test_a_file_named_by_16_extent_lines_or_16_chain_links_is_cached_once(tmp_path):
    """A 34 KB sparse file named 16 times drove the cache to 16 x 64 MiB (2 GiB with 8192
    tables); shared, it stays at one 64 MiB cache under the 128 MiB budget."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [repeated(tmp_path / "a", 16, 4096), chain(tmp_path / "b", 16, 4096)]
    for result in run_limited(paths):
        assert result["ok"], result
        assert result["seconds"] < 30, result


def test_extent_lines_and_chain_links_share_the_open_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with open_vmdk(repeated(tmp_path / "a", 5, n_tables=64)) as d:
        extents = {id(p.extent) for p in d._parts}
        assert len(extents) == 1
        assert d.read(0, 4096) == b"\x5a" * 4096
        assert d.read(5 * 64 * 16 * MiB - 16 * MiB, 4096) == b"\x5a" * 4096
    with open_vmdk(chain(tmp_path / "b", 4, n_tables=64)) as d:
        links, disk = [], d
        while disk is not None:
            links.append(disk._parts[0].extent)
            disk = disk.parent
        assert len(links) == 4 and len({id(e) for e in links}) == 1
        assert d.read(16 * MiB, 4096) == b"\x5a" * 4096
    assert links[0].file.closed             # the last user closed it


def test_chain_of_distinct_files_shares_one_cache_budget(tmp_path):
    """12 links, each its own 34 KB file of 4096 tables: one 128 MiB budget, not 12 x 64."""
    result, = run_limited([chain(tmp_path, 12, 4096, distinct=True)])
    assert result["ok"], result


def _descriptors_of(path) -> int:
    """How many of this process's file descriptors are open on ``path`` (other threads of
    the test process open and close their own meanwhile: count only ours)."""
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:       # closed since the listing
            pass
    return count


def test_a_flat_file_named_by_thousands_of_lines_is_opened_once(tmp_path):
    p = repeated_flat(tmp_path, 5000)
    flat = tmp_path / "f-flat.vmdk"
    assert _descriptors_of(flat) == 0
    with open_vmdk(p) as d:
        assert _descriptors_of(flat) == 1
        assert d.size == 5000 * 4096 and d.read(d.size - 4096, 4096) == b"\x42" * 4096
    assert _descriptors_of(flat) == 0


def test_grain_directories_of_one_open_disk_are_bounded(tmp_path, monkeypatch):
    """Directories count once per file against one budget per open disk, parents included."""
    monkeypatch.setattr(sparse_mod, "DIRECTORY_BUDGET_BYTES", 1 * MiB)
    for name in ("x.vmdk", "y.vmdk"):
        (tmp_path / name).write_bytes(hostile_sparse(65536, gtes=512))    # 768 KiB in memory
    sectors = 65536 * 512 * 8
    same = tmp_path / "same.vmdk"
    same.write_text(descriptor([f'RW {sectors} SPARSE "x.vmdk"'] * 3))
    with open_vmdk(same) as d:
        assert d.read(0, 8) == b"\x5a" * 8
    two = tmp_path / "two.vmdk"
    two.write_text(descriptor([f'RW {sectors} SPARSE "x.vmdk"', f'RW {sectors} SPARSE "y.vmdk"']))
    with pytest.raises(DiskFormatError, match="open disk may hold") as err:
        open_vmdk(two)
    assert err.value.path == str(tmp_path / "y.vmdk") and err.value.offset == 512


def test_directory_of_too_many_entries_is_refused(tmp_path):
    """1-sector grains in 1-entry tables: 16M directory entries from a 2-sector header."""
    p = tmp_path / "g.vmdk"
    p.write_bytes(HEADER.pack(b"KDMV", 1, 1, 1 << 24, 1, 0, 0, 1, 0, 1, 2, 0, b"\n \r\n",
                              0).ljust(1024, b"\0"))
    with pytest.raises(CorruptHeaderError, match="at most") as err:
        open_vmdk(p)
    assert err.value.offset == 12


# --- time: descriptor text is parsed in linear time ------------------------------------

HEAD = (b'# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
        b'createType="monolithicFlat"\nRW 8 ZERO\n')
TEXT_SHAPES = {
    "blanks inside a value": HEAD + b'ddb.x = "a' + b" " * 900_000 + b'b"\n',
    "blanks before the =": HEAD + b"ddb.x" + b" " * 900_000 + b"= 1\n",
    "blank lines in non-UTF-8 text": HEAD + b'ddb.y = "\xff"\n' + b"\n" * 900_000,
    "blank lines of spaces, non-UTF-8": HEAD + b'ddb.y = "\xff"\n' + b" \n" * 450_000,
    "tabs after a value": HEAD + b"ddb.x = 1" + b"\t" * 900_000 + b"\n",
    "blanks inside an extent line": HEAD + b'RW 8 FLAT "x"' + b" " * 900_000 + b"0\n",
    "a long sector count": HEAD + b"RW " + b"1" * 900_000 + b" ZERO\n",
    "carriage returns": HEAD + b"\r" * 900_000,
}


@pytest.mark.parametrize("shape", sorted(TEXT_SHAPES))
def test_descriptor_text_of_a_megabyte_parses_in_linear_time(tmp_path, shape):
    p = tmp_path / "d.vmdk"
    p.write_bytes(TEXT_SHAPES[shape])
    t = time.monotonic()
    try:
        open_vmdk(p).close()
    except DiskFormatError as e:
        assert e.path == str(p) and e.offset is not None
    assert time.monotonic() - t < 3, shape


# --- refusals name file and offset; absurd sizes are one line ---------------------------

def test_parent_hint_without_parent_cid_is_located(tmp_path):
    parent = qemu_convert(write_raw(tmp_path / "p.raw", MiB, [(0, b"\x11" * 4096)]),
                          tmp_path / "p.vmdk", "monolithicSparse")
    child = make_child(parent, tmp_path / "c.vmdk")
    data = child.read_bytes()
    at = data.find(b"parentCID=")
    end = data.find(b"\n", at)
    child.write_bytes(data[:at] + b"#" * (end - at) + data[end:])     # the line, blanked
    with pytest.raises(CidMismatchError, match="no parentCID") as err:
        open_vmdk(child)
    assert err.value.path == str(child)
    assert err.value.offset == 512 + data[512:].find(b"parentFileNameHint")
    with open_vmdk(child, ignore_cid_mismatch=True) as d:
        assert d.read(0, 4096) == b"\x11" * 4096


def test_one_exbibyte_descriptor_is_a_one_line_error(tmp_path):
    """118 bytes naming 1 EiB: info and scan refuse it in one line, not a MemoryError."""
    p = tmp_path / "eib.vmdk"
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
                 'createType="monolithicFlat"\nRW 2251799813685248 ZERO\n')
    with pytest.raises(DescriptorError, match="sectors") as err:
        open_vmdk(p)
    assert err.value.offset == p.read_bytes().find(b"RW ")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args in (["info", str(p)], ["scan", str(p), "-o", str(tmp_path / "m")],
                 ["convert", str(p), str(tmp_path / "o.raw")]):
        proc = subprocess.run([sys.executable, "-m", "smsblock", *args], capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"{p}, offset" in proc.stderr, proc.stderr


@pytest.mark.parametrize("capacity", [1 << 51, (1 << 37) + 1])
def test_absurd_sparse_capacity_is_refused(tmp_path, capacity):
    p = tmp_path / "s.vmdk"
    p.write_bytes(hostile_sparse(16, capacity=capacity))
    with pytest.raises(CorruptHeaderError, match="absurd") as err:
        open_vmdk(p)
    assert err.value.offset == 12


# --- a delta whose header gives no descriptorOffset ------------------------------------

def test_delta_without_descriptor_offset_reads_its_parent_like_qemu(tmp_path):
    """qemu takes a sparse file's descriptor from sector 1 whatever the header says."""
    raw = write_raw(tmp_path / "p.raw", 4 * MiB, [(0, b"\x11" * 65536), (2 * MiB, b"\x22" * 65536)])
    parent = qemu_convert(raw, tmp_path / "p.vmdk", "monolithicSparse")
    child = make_child(parent, tmp_path / "c.vmdk")
    qemu_io(child, "write -P 0x33 1M 64k")
    data = bytearray(child.read_bytes())
    assert struct.unpack_from("<Q", data, 28)[0] == 1      # qemu wrote it at sector 1
    data[28:44] = bytes(16)                                 # descriptorOffset, descriptorSize
    child.write_bytes(bytes(data))
    expected = oracle_raw(child, tmp_path)
    assert expected[0] == 0x11 and expected[2 * MiB] == 0x22     # qemu reads the parent
    with smsblock.open_disk(child) as d:
        assert d.info.parent is not None and d.info.parent.path == str(parent)
        assert d.read(0, d.size) == expected
        assert d.info.cid == int(data[512:].split(b"CID=")[1][:8], 16)


def test_sparse_extent_without_a_descriptor_at_sector_1_has_none(tmp_path):
    """VMware's extent files keep binary data at sector 1: no descriptor is made of it."""
    p = tmp_path / "s.vmdk"
    p.write_bytes(hostile_sparse(16))
    with open_vmdk(p) as d:
        assert d.info.parent is None and d.info.cid is None
        assert d.read(0, 8) == b"\x5a" * 8


# --- the fuzz -------------------------------------------------------------------------

def _random_text(rng: random.Random) -> bytes:
    pad = rng.choice([b" ", b"\t", b"\n", b" \n", b"\r", b"\r\n", b"1", b"=", b'"'])
    n = rng.randrange(1, 300_000 // len(pad))
    body = rng.choice([b'ddb.x = "a%sb"\n', b"ddb.x%s= 1\n", b"RW 8 FLAT%sx\n",
                       b"RW 8 %s ZERO\n", b"%s\n", b"RW %s ZERO\n"]) % (pad * n)
    head = bytearray(HEAD)
    if rng.random() < 0.5:
        head += b'ddb.y = "\xff"\n'
    return bytes(head) + body


def _case(rng: random.Random, folder: Path) -> Path:
    shape = rng.choice(["repeat", "chain", "broken-chain", "text", "sizes", "flat-repeat"])
    folder.mkdir()
    if shape == "repeat":
        return repeated(folder, rng.randrange(1, 24), rng.choice([16, 512, 4096]))
    if shape == "chain":
        return chain(folder, rng.randrange(2, 24), rng.choice([16, 512, 2048]),
                     distinct=rng.random() < 0.5)
    if shape == "flat-repeat":
        return repeated_flat(folder, rng.randrange(1, 10000))
    if shape == "broken-chain":
        top = chain(folder, rng.randrange(2, 12), 64)
        victim = folder / f"c{rng.randrange(0, 2)}.vmdk"
        text = victim.read_text()
        text = rng.choice([
            lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("parentCID")),
            lambda t: t.replace('parentFileNameHint="c', 'parentFileNameHint="missing-c'),
            lambda t: t.replace('parentFileNameHint="c1', 'parentFileNameHint="c0'),
            lambda t: t.replace("CID=", "CID=zz"),
        ])(text)
        victim.write_text(text)
        return top
    if shape == "text":
        p = folder / "d.vmdk"
        p.write_bytes(_random_text(rng))
        return p
    p = folder / "s.vmdk"
    capacity = rng.choice([1 << 63, 1 << 51, 1 << 40, (1 << 37) + 1, 1 << 30])
    p.write_bytes(hostile_sparse(rng.choice([1, 16, 8192]), capacity=capacity))
    if rng.random() < 0.5:
        d = folder / "d.vmdk"
        d.write_text(descriptor([f'RW {rng.choice([1 << 20, 1 << 37, 1 << 51, 1 << 64])} '
                                 f'SPARSE "s.vmdk"'] * rng.randrange(1, 4)))
        return d
    return p


@pytest.mark.timeout(240)
def test_fuzz_shapes_stay_bounded_in_memory_and_time(tmp_path):
    """Random shapes (repeated files, chains, broken chains, text, sizes) under limits."""
    seed = int(os.environ.get("SMSBLOCK_FUZZ_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)
    paths = [_case(rng, tmp_path / f"case{i}") for i in range(16)]
    for result in run_limited(paths, timeout=180):
        try:
            assert_clean(result, max_seconds=20)
        except AssertionError as e:
            raise AssertionError(f"SMSBLOCK_FUZZ_SEED={seed}: {e}") from None
