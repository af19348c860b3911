"""The S3 backend's read-ahead (smsblock/backend/readahead.py) against the meaning of a
read: ``data[offset:offset + length]``, whatever the order and threads of the reads, with
streams fetched a window at a time and lone reads fetched exactly."""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings, strategies as st

from smsblock.backend.readahead import Readahead

MiB = 1 << 20


class Objects:
    """Objects held in memory, counting what is fetched from them (a ranged GET each)."""

    def __init__(self, **objects):
        self.objects = objects
        self.fetches: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()

    def fetch(self, name, offset, length):
        with self.lock:
            self.fetches.append((name, offset, length))
        return self.objects[name][offset:offset + length]


def test_parallel_walkers_of_one_object_share_its_windows():
    """Four threads each walking their own part of a pack (as a restore's workers do) get
    the right bytes from a window per MiB, plus at most one exact read each to start."""
    data = os.urandom(4 * MiB)
    objs = Objects(pack=data)
    ra = Readahead(objs.fetch, MiB)
    block = 40_000
    starts = list(range(0, len(data), block))
    parts = [starts[i::4] for i in range(4)]        # interleaved, as chunks on 4 workers

    def walk(offsets):
        for off in offsets:
            assert ra.read("pack", off, block) == data[off:off + block]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(walk, parts))
    windows = [f for f in objs.fetches if f[2] == MiB]
    exact = [f for f in objs.fetches if f[2] != MiB]
    assert len({w[1] for w in windows}) == len(windows) <= 4 + 1       # each window once
    assert len(exact) <= 4, exact
    assert len(objs.fetches) < len(starts) // 10


def test_lone_and_far_apart_reads_are_fetched_exactly():
    data = os.urandom(64 * MiB)
    objs = Objects(pack=data)
    ra = Readahead(objs.fetch, 4 * MiB)
    for off in (50 * MiB, 1000, 30 * MiB, 10 * MiB, 61 * MiB):
        assert ra.read("pack", off, 100) == data[off:off + 100]
    assert [f[2] for f in objs.fetches] == [100] * 5
    # other objects' reads are not a stream of this one
    objs.objects["other"] = data
    assert ra.read("other", 50 * MiB + 100, 100) == data[50 * MiB + 100:50 * MiB + 200]
    assert objs.fetches[-1] == ("other", 50 * MiB + 100, 100)


def test_a_window_being_fetched_is_waited_for_not_fetched_again():
    data = os.urandom(2 * MiB)
    objs = Objects(pack=data)
    started, release = threading.Event(), threading.Event()

    def slow(name, offset, length):
        if length == MiB:
            started.set()
            assert release.wait(10)
        return objs.fetch(name, offset, length)

    ra = Readahead(slow, MiB)
    assert ra.read("pack", 0, 1000) == data[:1000]                  # exact: the first read
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(ra.read, "pack", 1000, 1000)              # a stream: window 0
        assert started.wait(10)
        rest = [pool.submit(ra.read, "pack", off, 1000) for off in (2000, 5000)]
        release.set()
        assert first.result() == data[1000:2000]
        assert [f.result() for f in rest] == [data[2000:3000], data[5000:6000]]
    assert objs.fetches.count(("pack", 0, MiB)) == 1


def test_a_failed_window_fails_its_waiters_and_is_asked_again():
    """The thread fetching a window fails: a thread waiting for that window gets the
    error too (never waits forever), and the next read fetches the window again."""
    data = os.urandom(2 * MiB)
    objs = Objects(pack=data)
    started, release = threading.Event(), threading.Event()
    fail = [True]

    def flaky(name, offset, length):
        if length == MiB and fail[0]:
            started.set()
            assert release.wait(10)
            fail[0] = False
            raise OSError("connection reset")
        return objs.fetch(name, offset, length)

    ra = Readahead(flaky, MiB)
    ra.read("pack", 0, 100)
    with ThreadPoolExecutor(2) as pool:
        owner = pool.submit(ra.read, "pack", 100, 100)          # fetches window 0
        assert started.wait(10)
        waiter = pool.submit(ra.read, "pack", 200, 100)         # waits for it
        time.sleep(0.2)
        assert not waiter.done()
        release.set()
        for f in (owner, waiter):
            with pytest.raises(OSError, match="reset"):
                f.result(timeout=10)
    assert ra.read("pack", 300, 100) == data[300:400]           # fetched again, not stuck
    assert objs.fetches[-1] == ("pack", 0, MiB)


def test_a_pack_index_read_before_its_footer_is_fetched_exactly():
    """A pack's footer is read, then its index just before it: reading backward is not
    a stream, so neither pulls in a window (a small last pack would cost 4 MiB a read)."""
    data = os.urandom(3 * MiB + 5000)
    objs = Objects(pack=data)
    ra = Readahead(objs.fetch, 4 * MiB)
    size = len(data)
    assert ra.read("pack", size - 64, 64) == data[-64:]
    assert ra.read("pack", size - 64 - 60_000, 60_000) == data[-60_064:-64]
    assert [f[1:] for f in objs.fetches] == [(size - 64, 64), (size - 60_064, 60_000)]


def test_reads_across_windows_and_past_the_end_are_those_of_the_object():
    data = os.urandom(MiB + 12345)
    objs = Objects(pack=data)
    ra = Readahead(objs.fetch, 256 << 10)
    pos = 16
    while pos < len(data):
        assert ra.read("pack", pos, 40_000) == data[pos:pos + 40_000]
        pos += 40_000
    assert ra.read("pack", len(data) - 10, 100) == data[-10:]
    assert ra.read("pack", len(data) + 5, 100) == b""


def test_what_is_held_is_bounded_and_forgotten_on_request():
    objs = Objects(**{f"p{i}": os.urandom(64 << 10) for i in range(200)})
    ra = Readahead(objs.fetch, 16 << 10)
    for name in objs.objects:
        for off in range(0, 64 << 10, 4096):
            ra.read(name, off, 4096)
    assert len(ra._windows) <= Readahead.MAX_WINDOWS
    assert len(ra._ends) <= Readahead.MAX_OBJECTS
    name = "p199"
    objs.objects[name] = os.urandom(64 << 10)                     # replaced
    ra.forget(name)
    assert ra.read(name, 0, 4096) == objs.objects[name][:4096]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 5000), ahead=st.sampled_from([0, 1, 7, 64, 1000]),
       reads=st.lists(st.tuples(st.integers(0, 5200), st.integers(0, 1200)), max_size=40))
def test_every_read_is_the_objects_bytes(size, ahead, reads):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ra = Readahead(Objects(o=data).fetch, ahead)
    for offset, length in reads:
        assert ra.read("o", offset, length) == data[offset:offset + length]
