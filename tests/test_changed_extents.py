"""Runs given the changed extents (issue 11, outcome 5): only the listed blocks are read,
the rest carried over; a wrong list is refused before anything is written; a list that
misses a change is caught by the deep verify (``verify --deep``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from smsblock import scanner
from smsblock.disk import Disk, open_disk
from smsblock.engine import replicate, restore, verify_run_against_disk
from smsblock.errors import UsageError
from smsblock.store import StoreConfig, open_store

BS = 64 * 1024


def new_store(path):
    store = open_store(path)
    store.initialise(StoreConfig(pack_size=256 * 1024, address="sha256"))
    return store


def write_at(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def make_disk(path, size: int, writes) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    for off, data in writes:
        write_at(path, off, data)


def tree_state(root) -> dict:
    """Every file under the store with its content digest (but the empty lock file,
    which taking the lock creates)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == "lock" and dirpath == str(root):
                continue
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def merged(extents):
    """Sorted, merged (offset, length) pairs of possibly overlapping byte ranges."""
    out = []
    for off, length in sorted(extents):
        if out and off <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], off + length)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((off, length))
    return out


class CountingDisk(Disk):
    """A real raw disk, wrapped to record every read and every extents() question."""

    def __init__(self, inner):
        self.inner, self.path, self.size, self.info = inner, inner.path, inner.size, inner.info
        self.reads, self.extent_queries = [], []

    def readinto(self, offset, buf):
        self.reads.append((offset, len(buf)))
        return self.inner.readinto(offset, buf)

    def extents(self, start=0, end=None):
        self.extent_queries.append((start, end))
        return self.inner.extents(start, end)

    def close(self):
        self.inner.close()


# --- the property: a correct list gives exactly a full scan's run ---------------------

write_op = st.tuples(st.integers(0, 10 * BS), st.integers(1, 2 * BS),
                     st.sampled_from(["random", "zeros", "same"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_blocks=st.integers(1, 10), tail=st.sampled_from([0, 4096, 30000]),
       first=st.lists(st.tuples(st.integers(0, 10 * BS), st.integers(1, BS)), max_size=6),
       changes=st.lists(write_op, max_size=6), seed=st.integers(0, 2**32 - 1))
def test_change_list_run_equals_full_scan_run(tmp_path_factory, n_blocks, tail, first,
                                              changes, seed):
    rng = np.random.default_rng(seed)
    d = tmp_path_factory.mktemp("prop")
    size = n_blocks * BS - (BS - tail if tail else 0)
    disk = str(d / "disk.raw")
    make_disk(disk, size, [(o, rng.bytes(min(n, size - o))) for o, n in first if o < size])
    a, b = new_store(d / "a"), new_store(d / "b")
    replicate(disk, a, "srv", block_size=BS)
    replicate(disk, b, "srv", block_size=BS)
    written = []
    for off, length, kind in changes:
        if off >= size:
            continue
        length = min(length, size - off)
        with open(disk, "rb") as f:
            f.seek(off)
            old = f.read(length)
        data = {"random": rng.bytes(length), "zeros": bytes(length), "same": old}[kind]
        write_at(disk, off, data)
        written.append((off, length))
    changed = merged(written)
    s_list = replicate(disk, a, "srv", changed_extents=changed)
    s_full = replicate(disk, b, "srv")
    m_list, m_full = a.load_manifest("srv", s_list.run_id), b.load_manifest("srv", s_full.run_id)
    assert np.array_equal(m_list.states, m_full.states)
    assert np.array_equal(m_list.hashes, m_full.hashes)
    assert np.array_equal(m_list.addresses, m_full.addresses)
    assert s_list.blocks_changed == s_full.blocks_changed
    assert s_list.blocks_stored == s_full.blocks_stored
    # only touched blocks were read
    touched = {i for off, n in changed for i in range(off // BS, (off + n - 1) // BS + 1)}
    assert s_list.bytes_read <= len(touched) * BS
    restore(a, "srv", str(d / "out.raw"))
    with open(disk, "rb") as f1, open(d / "out.raw", "rb") as f2:
        assert f1.read() == f2.read()
    assert verify_run_against_disk(a, "srv", disk).ok


def test_only_the_listed_extents_are_read(tmp_path):
    size = 64 * BS
    disk = str(tmp_path / "disk.raw")
    make_disk(disk, size, [(0, os.urandom(size))])
    store = new_store(tmp_path / "s")
    replicate(disk, store, "srv", block_size=BS)
    extents = [(3 * BS + 100, 10), (3 * BS + 500, BS), (40 * BS, 2 * BS), (63 * BS, BS)]
    for off, n in extents:
        write_at(disk, off, os.urandom(n))
    wrapped = CountingDisk(open_disk(disk))
    try:
        s = replicate(wrapped, store, "srv", changed_extents=extents)
    finally:
        wrapped.close()
    touched = {3, 4, 40, 41, 63}
    read_blocks = set()
    for off, n in wrapped.reads:
        assert off % BS == 0
        read_blocks.update(range(off // BS, (off + n - 1) // BS + 1))
    assert read_blocks == touched
    assert sum(n for _, n in wrapped.reads) == len(touched) * BS == s.bytes_read
    # the disk was asked for the extents of the listed blocks only, not the whole disk
    assert all(end is not None and end - start <= 2 * BS for start, end in wrapped.extent_queries)
    assert s.blocks_data_changed == len(touched)
    m = store.load_manifest("srv")
    assert m.meta["scan"]["changed_list_blocks"] == len(touched)
    restore(store, "srv", str(tmp_path / "out.raw"))
    with open(disk, "rb") as f1, open(tmp_path / "out.raw", "rb") as f2:
        assert f1.read() == f2.read()


def test_objects_with_offset_and_length_and_trimmed_blocks(tmp_path):
    """Extent objects are accepted; a listed block that is a hole now becomes unallocated."""
    size = 8 * BS
    disk = str(tmp_path / "disk.raw")
    make_disk(disk, size, [(0, os.urandom(size))])
    store = new_store(tmp_path / "s")
    replicate(disk, store, "srv", block_size=BS)
    # punch block 2 (rewrite the file sparse without it), change block 5
    content = bytearray(open(disk, "rb").read())
    content[2 * BS:3 * BS] = bytes(BS)
    content[5 * BS:5 * BS + 7] = b"changed"
    with open(disk, "wb") as f:
        f.truncate(size)
        for i in range(8):
            if i != 2:
                f.seek(i * BS)
                f.write(content[i * BS:(i + 1) * BS])
    ext = list(open_disk(disk).extents())
    with open_disk(disk) as d:
        from smsblock.disk import Extent, ExtentKind
        objs = [Extent(2 * BS, BS, ExtentKind.DATA), Extent(5 * BS, 7, ExtentKind.DATA)]
        replicate(d, store, "srv", changed_extents=iter(objs))
    assert ext   # the file is sparse where block 2 was
    m = store.load_manifest("srv")
    assert m.states.tolist() == [2, 2, 0, 2, 2, 2, 2, 2]
    assert verify_run_against_disk(store, "srv", disk).ok


# --- a list that misses a change: the deep verify catches it ---------------------------

def test_deep_verify_finds_a_change_the_list_missed(tmp_path):
    size = 16 * BS
    disk = str(tmp_path / "disk.raw")
    make_disk(disk, size, [(0, os.urandom(size))])
    store = new_store(tmp_path / "s")
    replicate(disk, store, "srv", block_size=BS)
    write_at(disk, 2 * BS, b"listed")
    write_at(disk, 9 * BS + 17, b"missed")
    s = replicate(disk, store, "srv", changed_extents=[(2 * BS, 6)])
    r = verify_run_against_disk(store, "srv", disk)
    assert not r.ok
    assert r.differing_blocks == [9] and r.blocks_differing == 1 and r.run_id == s.run_id
    assert "block" in r.problems[0] and "9" in r.problems[0]
    assert r.bytes_read == size
    # CLI: exit 1, names the block; JSON too
    cli = [sys.executable, "-m", "smsblock", "verify", "--store", str(tmp_path / "s"),
           "--deep", "--server", "srv", "--disk", disk]
    p = subprocess.run(cli, capture_output=True, text=True)
    assert p.returncode == 1 and "FAILED" in p.stdout and "blocks 9" in p.stdout, p.stdout
    p = subprocess.run(cli + ["--json"], capture_output=True, text=True)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and doc["ok"] is False and doc["differing_blocks"] == [9]
    # a full run repairs it; the older run still differs when named
    replicate(disk, store, "srv")
    assert verify_run_against_disk(store, "srv", disk).ok
    assert not verify_run_against_disk(store, "srv", disk, run_id=s.run_id).ok
    p = subprocess.run(cli, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("OK"), p.stdout + p.stderr
    p = subprocess.run(cli + ["--run", s.run_id], capture_output=True, text=True)
    assert p.returncode == 1


def test_deep_verify_other_size_and_usage(tmp_path):
    disk = str(tmp_path / "disk.raw")
    make_disk(disk, 4 * BS, [(0, os.urandom(BS))])
    replicate(disk, new_store(tmp_path / "s"), "srv", block_size=BS)
    os.truncate(disk, 5 * BS)
    r = verify_run_against_disk(tmp_path / "s", "srv", disk)
    assert not r.ok and "bytes" in r.problems[0]
    base = [sys.executable, "-m", "smsblock", "verify", "--store", str(tmp_path / "s")]
    for extra in (["--deep", "--server", "srv"], ["--deep", "--disk", disk],
                  ["--server", "srv", "--disk", disk]):
        p = subprocess.run(base + extra, capture_output=True, text=True)
        assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


# --- every kind of wrong list is refused before anything is written ---------------------

SIZE = 8 * BS + 1000

BAD_LISTS = [
    ([(0, 10), (SIZE - 5, 10)], "extent 1", "past the end"),
    ([(0, SIZE + 1)], "extent 0", "past the end"),
    ([(BS, 10), (0, 10)], "extent 1", "sorted"),
    ([(0, 100), (50, 10)], "extent 1", "overlap"),
    ([(-1, 10)], "extent 0", "negative"),
    ([(0, 0)], "extent 0", "at least 1"),
    ([(0, -5)], "extent 0", "at least 1"),
    ([(0, 10), (100, 1.5)], "extent 1", "integer"),
    ([("0", 10)], "extent 0", "integer"),
    ([(True, 10)], "extent 0", "integer"),
    ([(0, 10, 3)], "extent 0", "pair"),
    ([None], "extent 0", "pair"),
    ("0,10", "list", "pair"),
    (5, "list", "pair"),
]


@pytest.fixture
def replicated(tmp_path):
    disk = str(tmp_path / "disk.raw")
    make_disk(disk, SIZE, [(0, os.urandom(SIZE))])
    store = new_store(tmp_path / "s")
    replicate(disk, store, "srv", block_size=BS)
    return disk, store, tmp_path / "s"


@pytest.mark.parametrize("extents,where,what", BAD_LISTS)
def test_wrong_list_is_refused_and_store_unchanged(replicated, extents, where, what):
    disk, store, root = replicated
    write_at(disk, 0, b"changed")
    before = tree_state(root)
    with pytest.raises(UsageError) as e:
        replicate(disk, store, "srv", changed_extents=extents)
    msg = str(e.value)
    assert where in msg and what in msg and "\n" not in msg
    assert tree_state(root) == before


def test_too_many_extents(replicated, monkeypatch):
    disk, store, root = replicated
    monkeypatch.setattr(scanner, "MAX_CHANGED_EXTENTS", 3)
    before = tree_state(root)
    with pytest.raises(UsageError, match="more than 3 extents"):
        replicate(disk, store, "srv", changed_extents=((i * 10, 1) for i in range(10**9)))
    assert tree_state(root) == before
    replicate(disk, store, "srv", changed_extents=[(0, 1), (10, 1), (20, 1)])


def test_list_needs_a_comparable_previous_run(tmp_path):
    disk = str(tmp_path / "disk.raw")
    make_disk(disk, 4 * BS, [(0, os.urandom(4 * BS))])
    with pytest.raises(UsageError, match="no store"):
        replicate(disk, tmp_path / "none", "srv", changed_extents=[(0, 1)])
    assert not (tmp_path / "none").exists()
    store = new_store(tmp_path / "s")
    before = tree_state(tmp_path / "s")
    with pytest.raises(UsageError, match="has none"):
        replicate(disk, store, "srv", changed_extents=[(0, 1)])
    assert tree_state(tmp_path / "s") == before
    replicate(disk, store, "srv", block_size=BS)
    os.truncate(disk, 5 * BS)         # the disk grew: the list cannot say what the rest is
    before = tree_state(tmp_path / "s")
    with pytest.raises(UsageError, match="disk size"):
        replicate(disk, store, "srv", changed_extents=[(4 * BS, BS)])
    with pytest.raises(UsageError, match="block size"):
        replicate(disk, store, "srv", block_size=2 * BS, change_block_size=True,
                  changed_extents=[(0, 1)])
    assert tree_state(tmp_path / "s") == before


def test_numpy_rows_are_pairs(replicated):
    disk, store, _ = replicated
    write_at(disk, 5 * BS, b"x")
    s = replicate(disk, store, "srv", changed_extents=np.array([[5 * BS, 1]], np.int64))
    assert s.bytes_read == BS and s.blocks_changed == 1


def test_empty_list_carries_everything_over(replicated):
    disk, store, _ = replicated
    first = store.load_manifest("srv")
    s = replicate(disk, store, "srv", changed_extents=[])
    assert s.bytes_read == 0 and s.blocks_changed == 0 and s.blocks_stored == 0
    m = store.load_manifest("srv", s.run_id)
    assert np.array_equal(m.hashes, first.hashes) and np.array_equal(m.addresses, first.addresses)


# --- the CLI's JSON file ----------------------------------------------------------------

def cli_replicate(disk, root, *extra):
    return subprocess.run([sys.executable, "-m", "smsblock", "replicate", disk, "--store",
                           str(root), "--server", "srv", *extra], capture_output=True, text=True)


def test_cli_changed_extents_file(replicated, tmp_path):
    disk, store, root = replicated
    write_at(disk, 3 * BS + 5, b"new bytes")
    f = tmp_path / "changed.json"
    f.write_text(json.dumps({"extents": [{"offset": 3 * BS + 5, "length": 9}]}))
    p = cli_replicate(disk, root, "--changed-extents", str(f), "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["bytes_read"] == BS and doc["blocks_changed"] == 1
    restore(store, "srv", str(tmp_path / "out.raw"))
    with open(disk, "rb") as f1, open(tmp_path / "out.raw", "rb") as f2:
        assert f1.read() == f2.read()


@pytest.mark.parametrize("text,what", [
    ("{", "bad JSON"),
    ("\xff\xfe", "bad JSON"),
    ("[]", "JSON object"),
    ('{"extents": {}}', "JSON object"),
    ('{"extents": [], "more": 1}', "JSON object"),
    ('{"extents": [[0, 10]]}', "extent 0 must be an object"),
    ('{"extents": [{"offset": 0}]}', "extent 0 must be an object"),
    ('{"extents": [{"offset": 0, "length": 1, "x": 2}]}', "extent 0 must be an object"),
    ('{"extents": [{"offset": "0", "length": 10}]}', "offset must be an integer"),
    ('{"extents": [{"offset": 0, "length": 1.0}]}', "length must be an integer"),
    ('{"extents": [{"offset": 0, "length": true}]}', "length must be an integer"),
    ('{"extents": [{"offset": 0, "length": 10}, {"offset": 5, "length": 10}]}', "overlap"),
    ('{"extents": [{"offset": 0, "length": 99999999999}]}', "past the end"),
])
def test_cli_bad_changed_extents_file(replicated, tmp_path, text, what):
    disk, store, root = replicated
    f = tmp_path / "changed.json"
    f.write_bytes(text.encode("latin-1"))
    before = tree_state(root)
    p = cli_replicate(disk, root, "--changed-extents", str(f))
    assert p.returncode == 2, p.stderr
    assert what in p.stderr and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert tree_state(root) == before


def test_cli_changed_extents_file_not_regular_or_huge(replicated, tmp_path):
    disk, store, root = replicated
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate((16 << 20) + 1)         # sparse: cheap to make, refused by its size
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = tree_state(root)
    for path, what in ((huge, "larger than"), (fifo, "not a regular file"),
                       (tmp_path, "not a regular file"), (tmp_path / "none", "No such file")):
        p = cli_replicate(disk, root, "--changed-extents", str(path))
        assert p.returncode == 2 and what in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert tree_state(root) == before
