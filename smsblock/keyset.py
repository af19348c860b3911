"""Set operations on arrays of fixed-size keys (pack keys, content addresses) by sorting.

numpy's ``unique``, ``isin`` and ``setdiff1d`` import ``numpy.ma`` on their first call
(8-14 ms measured), and every CLI run pays that once in its start-up work; these do the
same with ``sort`` and ``searchsorted``, which work on any orderable dtype (void keys
compare as bytes)."""

from __future__ import annotations

import numpy as np


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """The distinct items of the 1-d array ``a``, sorted (``np.unique(a)``)."""
    a = np.sort(a)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), bool)
    keep[0] = True
    keep[1:] = a[1:] != a[:-1]
    return a[keep]


def isin(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per item of ``a``: whether ``b`` holds it (``np.isin(a, b)``)."""
    b = sorted_unique(b)
    if not len(b) or not len(a):
        return np.zeros(len(a), bool)
    at = np.searchsorted(b, a)
    at[at == len(b)] = len(b) - 1
    return b[at] == a
