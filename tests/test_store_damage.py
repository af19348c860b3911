"""Damaged and missing stored blocks (local store, real files): verify sees damage in
every byte of a pack, header included; a block whose stored copy is damaged or gone is
never built upon: the next run stores it again, restores read the sound copy, prune drops
the damaged one."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from smsblock.engine import prune, replicate, restore, verify
from smsblock.errors import StoreCorruptError
from smsblock.pack import FOOTER, HEADER, PackWriter, address_function
from smsblock.store import StoreConfig, open_store

BS = 64 * 1024


def make_disk(path, n_blocks: int, seed: int = 1) -> bytes:
    """Random 4-bit data: frames hold about half a block each."""
    data = np.random.default_rng(seed).integers(0, 16, n_blocks * BS, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def new_store(path, pack_size=4096):
    store = open_store(path)
    store.initialise(StoreConfig(pack_size=pack_size, address="sha256"))
    return store


def flip(path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def pack_paths(store_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(store_dir, "packs", "*", "*.pack")))


def test_verify_sees_a_flipped_bit_in_every_byte_of_a_pack(tmp_path):
    """Each byte of a sealed pack (header, frames, index, footer) flipped in turn, bit 0
    and bit 4: verify reports it every time (a zstd decoder ignores some frame bits, and
    the header's reserved bytes were never checked)."""
    disk = tmp_path / "d.raw"
    rng = np.random.default_rng(3)
    blocks = [bytes(BS - 40) + rng.integers(0, 256, 40, dtype=np.uint8).tobytes() for _ in range(3)]
    disk.write_bytes(b"".join(blocks))              # tiny frames: a pack of a few hundred bytes
    store_dir = tmp_path / "s"
    new_store(store_dir, pack_size=1 << 20)
    replicate(disk, store_dir, "x", block_size=BS)
    [path] = pack_paths(store_dir)
    good = open(path, "rb").read()
    assert verify(store_dir).ok and len(good) < 2000
    missed = []
    for offset in range(len(good)):
        for mask in (0x01, 0x10):
            flip(path, offset, mask)
            if verify(store_dir).ok:
                missed.append((offset, mask))
            flip(path, offset, mask)
    assert missed == [], f"damage verify does not see (pack of {len(good)} bytes): {missed}"
    for offset in range(HEADER.size):
        flip(path, offset)
        assert any("header" in p for p in verify(store_dir).problems), offset
        flip(path, offset)


def test_version_1_packs_still_read_and_verify(tmp_path):
    """Packs written before the frame checksum (version 1: 8 zero bytes) stay valid."""
    store_dir = tmp_path / "s"
    store = new_store(store_dir)
    content = make_disk(tmp_path / "d.raw", 2)
    replicate(tmp_path / "d.raw", store, "x", block_size=BS)
    for path in pack_paths(store_dir):
        raw = bytearray(open(path, "rb").read())
        raw[8:10] = (1).to_bytes(2, "little")
        foot = len(raw) - FOOTER.size
        raw[foot + 8:foot + 10] = (1).to_bytes(2, "little")
        raw[-8:] = bytes(8)
        open(path, "wb").write(raw)
    assert verify(store_dir).ok
    restore(store_dir, "x", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content


def test_a_damaged_frame_is_stored_again_by_the_next_run(tmp_path):
    store_dir = tmp_path / "s"
    new_store(store_dir)                                 # one block a pack
    content = make_disk(tmp_path / "d.raw", 4)
    replicate(tmp_path / "d.raw", store_dir, "x", block_size=BS)
    victim = pack_paths(store_dir)[1]
    flip(victim, HEADER.size + 100)
    report = verify(store_dir)
    assert not report.ok and report.damaged_packs == 1
    assert any(victim in p for p in report.problems)
    s = replicate(tmp_path / "d.raw", open_store(store_dir), "x")
    assert s.blocks_changed == 0 and s.blocks_stored == 1, "the damaged block is stored again"
    restore(store_dir, "x", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content
    # the damaged copy stays until prune drops it; then the store is whole again
    prune(store_dir, "x", keep=5)
    after = verify(store_dir)
    assert after.ok and after.damaged_packs == 0, after.problems
    assert not os.path.exists(victim) or open(victim, "rb").read() != b""
    for run in open_store(store_dir).list_run_ids("x"):
        restore(store_dir, "x", tmp_path / "o.raw", run_id=run)
        assert (tmp_path / "o.raw").read_bytes() == content


def test_a_restore_that_meets_a_damaged_block_makes_the_next_run_store_it(tmp_path):
    """No verify in between: the failed restore records the bad block."""
    store_dir = tmp_path / "s"
    new_store(store_dir, pack_size=1 << 20)              # every block in one pack
    content = make_disk(tmp_path / "d.raw", 4)
    replicate(tmp_path / "d.raw", store_dir, "x", block_size=BS)
    [path] = pack_paths(store_dir)
    flip(path, HEADER.size + 100)
    with pytest.raises(StoreCorruptError):
        restore(store_dir, "x", tmp_path / "o.raw")
    s = replicate(tmp_path / "d.raw", open_store(store_dir), "x")
    assert s.blocks_stored == 1
    restore(store_dir, "x", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content
    prune(store_dir, "x", keep=1)
    assert verify(store_dir).ok


def test_a_pack_damaged_outside_its_frames_is_not_built_upon(tmp_path):
    """A damaged header leaves every block readable (restores work) but no new run
    dedups against the pack; stored again, prune then drops the damaged pack."""
    store_dir = tmp_path / "s"
    new_store(store_dir, pack_size=1 << 20)
    content = make_disk(tmp_path / "d.raw", 3)
    replicate(tmp_path / "d.raw", store_dir, "x", block_size=BS)
    [path] = pack_paths(store_dir)
    flip(path, 13)                                       # a reserved header byte
    report = verify(store_dir)
    assert not report.ok and any("header" in p for p in report.problems)
    restore(store_dir, "x", tmp_path / "o.raw")          # the frames are sound
    assert (tmp_path / "o.raw").read_bytes() == content
    s = replicate(tmp_path / "d.raw", open_store(store_dir), "x")
    assert s.blocks_stored == 3
    # same blocks, same pack id: the sound copy replaced the damaged pack in place
    assert verify(store_dir).ok
    prune(store_dir, "x", keep=1)
    assert verify(store_dir).ok
    restore(store_dir, "x", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content


def test_a_missing_pack_and_a_wrong_damage_record(tmp_path):
    """A pack gone: the next run stores its blocks again.  A damage record naming a
    sound block costs one extra copy, never the block: prune reads it again first."""
    store_dir = tmp_path / "s"
    store = new_store(store_dir)
    content = make_disk(tmp_path / "d.raw", 3)
    replicate(tmp_path / "d.raw", store, "x", block_size=BS)
    paths = pack_paths(store_dir)
    os.unlink(paths[0])
    assert replicate(tmp_path / "d.raw", open_store(store_dir), "x").blocks_stored == 1
    store = open_store(store_dir)
    packs = sorted(store.list_packs())
    idx = store.pack_index(packs[1], store.list_packs()[packs[1]])
    store.record_damage(packs[1], [idx["address"][0].tobytes()])
    prune(store_dir, "x", keep=2)
    assert open_store(store_dir).list_damage_records() == {}
    assert verify(store_dir).ok
    restore(store_dir, "x", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content
    # an unreadable record marks its whole pack: not built upon, nothing lost
    (store_dir / "damaged" / f"{packs[2]}.json").write_bytes(b"{nonsense")
    s = replicate(tmp_path / "d.raw", open_store(store_dir), "x")
    assert s.blocks_stored == 1
    prune(store_dir, "x", keep=1)
    assert verify(store_dir).ok
    restore(store_dir, "x", tmp_path / "o.raw")
    assert (tmp_path / "o.raw").read_bytes() == content
