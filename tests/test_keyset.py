"""smsblock.keyset against numpy's own set operations (what it stands in for), on void
keys like the block index's and on integers; and a run's start-up no longer imports
numpy.ma (numpy's unique/isin do, 8-14 ms on a CLI run's first call)."""

import subprocess
import sys

import numpy as np
from hypothesis import given, settings, strategies as st

from smsblock.keyset import isin, sorted_unique

KEY = np.dtype((np.void, 40))


def keys(rows):
    return np.frombuffer(np.asarray(rows, np.uint8).tobytes(), KEY) if len(rows) else np.zeros(0, KEY)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=40, max_size=40), max_size=30),
       st.lists(st.lists(st.integers(0, 2), min_size=40, max_size=40), max_size=30))
def test_void_keys_as_numpy(a_rows, b_rows):
    a, b = keys(a_rows), keys(b_rows)
    assert sorted_unique(a).tobytes() == np.unique(a).tobytes()
    assert (isin(a, b) == np.isin(a, b)).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-5, 5), max_size=40), st.lists(st.integers(-5, 5), max_size=40))
def test_integers_as_numpy(a, b):
    a, b = np.array(a, np.int64), np.array(b, np.int64)
    assert (sorted_unique(a) == np.unique(a)).all()
    assert (isin(a, b) == np.isin(a, b)).all()


def test_a_run_does_not_import_numpy_ma(tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(range(256)) * 1024)
    code = ("import sys\nfrom smsblock.engine import replicate, restore\n"
            f"replicate({str(disk)!r}, {str(tmp_path / 's')!r}, 'x', block_size=65536)\n"
            f"replicate({str(disk)!r}, {str(tmp_path / 's')!r}, 'x')\n"
            f"restore({str(tmp_path / 's')!r}, 'x', {str(tmp_path / 'o.raw')!r})\n"
            "print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out[-1] == "False"
