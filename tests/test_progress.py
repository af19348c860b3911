"""Progress callbacks say the phase when they take it; two-argument callbacks work as before."""

from __future__ import annotations

import io
import os

import pytest

import smsblock
from smsblock.progress import PHASES, _Bar, with_phase

MIB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(3 * MIB)
        f.write(os.urandom(2 * MIB))
    return path


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, done, total, *, phase):
        self.calls.append((phase, done, total))

    def phases(self):
        seen = []
        for phase, _, _ in self.calls:
            if not seen or seen[-1] != phase:
                seen.append(phase)
        return seen

    def check_each_phase_counts_up_to_its_total(self):
        by_phase = {}
        for phase, done, total in self.calls:
            by_phase.setdefault(phase, []).append((done, total))
        for phase, calls in by_phase.items():
            dones = [d for d, _ in calls]
            assert dones == sorted(dones), phase
            assert calls[-1][0] == calls[-1][1], phase      # each phase ends at its total


def test_replicate_restore_verify_prune_say_their_phases(tmp_path, disk):
    store = tmp_path / "store"
    rec = Recorder()
    smsblock.replicate(disk, store, "web-01", progress=rec)
    assert rec.phases() == ["reading", "storing"]
    rec.check_each_phase_counts_up_to_its_total()
    assert rec.calls[-1][1] > 0          # storing counts the bytes the run stored
    with open(disk, "r+b") as f:         # a second run with other data: prune has work
        f.seek(3 * MIB)
        f.write(os.urandom(2 * MIB))
    smsblock.replicate(disk, store, "web-01")

    for op, phase in ((lambda p: smsblock.restore(store, "web-01", tmp_path / "out.raw", progress=p), "converting"),
                      (lambda p: smsblock.verify(store, progress=p), "verifying"),
                      (lambda p: smsblock.prune(store, "web-01", 1, progress=p), "pruning")):
        rec = Recorder()
        op(rec)
        assert rec.phases() == [phase]
        rec.check_each_phase_counts_up_to_its_total()


def test_convert_and_scan_say_theirs(tmp_path, disk):
    rec = Recorder()
    smsblock.convert(disk, tmp_path / "out.vmdk", format="vmdk", progress=rec)
    assert rec.phases() == ["converting"]
    rec = Recorder()
    with smsblock.open_disk(disk) as d:
        smsblock.scan(d, progress=rec)
    assert rec.phases() == ["reading"]


def test_two_argument_and_kwargs_callbacks(tmp_path, disk):
    plain, kwargs = [], []
    smsblock.replicate(disk, tmp_path / "s", "web-01", progress=lambda done, total: plain.append(done))
    smsblock.replicate(disk, tmp_path / "s", "web-02",
                       progress=lambda done, total, **kw: kwargs.append(kw["phase"]))
    assert plain and set(kwargs) == {"reading", "storing"}


def test_with_phase_rules():
    assert with_phase(None, "reading") is None
    with pytest.raises(ValueError):
        with_phase(print, "sleeping")
    seen = []
    outer = with_phase(lambda d, t, phase: seen.append(phase), "reading")
    with_phase(outer, "converting")(1, 1)          # re-wrapped: the new phase, not both
    outer(1, 1)
    assert seen == ["converting", "reading"]
    assert set(PHASES) >= {"reading", "storing", "uploading", "converting"}


def test_the_terminal_line_names_the_phase_in_binary_units():
    out = io.StringIO()
    bar = _Bar("replicate web-01", out, interval=0)
    bar.update(3 * MIB, 8 * MIB, phase="reading")
    bar.update(1024, 4096, phase="storing")
    text = out.getvalue()
    assert "replicate web-01 (reading)" in text and "3 MiB / 8 MiB" in text
    assert "replicate web-01 (storing)" in text and "1 KiB / 4 KiB" in text
    assert "MB" not in text.replace("MiB", "")
