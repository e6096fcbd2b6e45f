# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The interpreter's bounds checker (tests/bounds.py, installed by conftest) catches an access past a tensor."""

import pytest
import torch
import triton
import triton.language as tl

from fla_mesa.utils import is_interpreting

pytestmark = pytest.mark.skipif(not is_interpreting(), reason='checks the Triton interpreter')


@triton.jit
def _copy(x, y, n, BLOCK: tl.constexpr, SHIFT: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o + SHIFT, mask=o < n), mask=o < n)


def test_in_bounds_masked_access_passes():
    x, y = torch.arange(10.), torch.zeros(10)
    _copy[(1,)](x, y, 10, BLOCK=16, SHIFT=0)
    assert torch.equal(x, y)


def test_out_of_bounds_load_is_caught():
    # the mask covers 10 lanes, but shifted by one the last reads past x (into memory of buf no kernel argument has)
    buf = torch.arange(20.)
    x, y = buf[:10], torch.zeros(10)
    with pytest.raises(Exception, match='out-of-bounds load of 1 lanes'):
        _copy[(1,)](x, y, 10, BLOCK=16, SHIFT=1)


def test_out_of_bounds_store_is_caught():
    out = torch.zeros(16)
    x, y = torch.arange(12.), out[:10]
    with pytest.raises(Exception, match='out-of-bounds store of 2 lanes'):
        _copy[(1,)](x, y, 12, BLOCK=16, SHIFT=0)
