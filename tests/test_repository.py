"""The repository over a backend: any Backend works with the engine; object names never
leave the backend; a large manifest is published from a file."""

from __future__ import annotations

import os

import numpy as np
import pytest

from smsblock.backend.local import LocalBackend
from smsblock.engine import replicate, restore, verify
from smsblock.errors import StoreError
from smsblock.repository import Repository
from smsblock.store import StoreConfig, open_store

BS = 64 << 10


def test_a_repository_over_a_backend_is_a_store(tmp_path):
    disk = tmp_path / "d.raw"
    content = np.random.default_rng(4).integers(0, 16, 6 * BS, dtype=np.uint8).tobytes()
    disk.write_bytes(content)
    repo = Repository(LocalBackend(tmp_path / "s"))
    repo.initialise(StoreConfig(pack_size=100 << 10))
    s = replicate(disk, repo, "x", block_size=BS)
    assert s.blocks_stored == 6
    restore(repo, "x", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content
    # the same objects, opened as the built-in local store
    assert verify(open_store(tmp_path / "s")).ok
    assert sorted(repo.backend.list("runs/")) == [f"runs/x/{s.run_id}.manifest"]


@pytest.mark.parametrize("name", ["../x", "a//b", "/abs", "a/./b", "tmp/leftover", "lock",
                                  "cache/pack-fingerprints", "a\nb", "a/b/c/d/e", ""])
def test_object_names_never_leave_the_backend(tmp_path, name):
    b = LocalBackend(tmp_path / "s")
    b.prepare()
    for call in (lambda: b.put(name, b"x"), lambda: b.get(name), lambda: b.delete(name),
                 lambda: b.stat(name)):
        with pytest.raises(StoreError, match="not an object name"):
            call()
    assert sorted(os.listdir(tmp_path / "s")) == ["tmp"]


def test_names_are_what_a_listing_names(tmp_path):
    """``names`` (the directory's entry types, no stat per object) lists what ``list``
    lists: nested objects, never links, folders or internal files."""
    b = LocalBackend(tmp_path / "s")
    b.prepare()
    for name in ("runs/a/r-1.manifest", "runs/a/r-2.manifest", "runs/b/r-1.manifest",
                 "packs/00/p", "top"):
        b.put(name, b"x")
    (tmp_path / "s" / "runs" / "a" / "planted").symlink_to(tmp_path / "s" / "top")
    (tmp_path / "s" / "runs" / "empty").mkdir()
    os.mkfifo(tmp_path / "s" / "runs" / "b" / "fifo")
    for prefix in ("", "runs/", "runs/a/", "packs/", "none/"):
        assert sorted(b.names(prefix)) == sorted(b.list(prefix))
    assert sorted(b.names("runs/")) == ["runs/a/r-1.manifest", "runs/a/r-2.manifest",
                                        "runs/b/r-1.manifest"]


def one_run(tmp_path):
    """A local store with one run of a small disk: ``(disk path, store, summary)``."""
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(range(256)) * (2 * BS // 256))
    store = open_store(tmp_path / "s")
    store.initialise()
    return disk, store, replicate(disk, store, "x", block_size=BS)


def test_a_manifest_is_published_from_a_staged_file(tmp_path):
    disk, store, s = one_run(tmp_path)
    data = store.get_manifest_bytes("x", s.run_id)
    staged = store.staging_path(".manifest.tmp")
    with open(staged, "xb") as f:
        f.write(data)
    run_id = s.run_id[:-8] + "0" * 8
    store.put_manifest_file("x", run_id, staged)
    assert not os.path.exists(staged)
    assert store.get_manifest_bytes("x", run_id) == data
    assert oct(os.stat(tmp_path / "s" / "runs" / "x" / f"{run_id}.manifest").st_mode & 0o777) == "0o600"
    with pytest.raises(StoreError, match="not a file staged"):
        store.put_manifest_file("x", run_id, str(disk))


def test_a_manifest_reads_in_ranges(tmp_path):
    _disk, store, s = one_run(tmp_path)
    whole = store.get_manifest_bytes("x", s.run_id)
    parts = [store.get_manifest_bytes("x", s.run_id, o, 100) for o in range(0, len(whole), 100)]
    assert b"".join(parts) == whole and store.get_manifest_bytes("x", s.run_id, 10) == whole[10:]
