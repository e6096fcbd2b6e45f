# Copyright (c) 2026, fla-mesa contributors. MIT license.

import inspect
import os
import warnings

import pytest
import torch

from fla_mesa.utils import is_interpreting

warnings.filterwarnings('ignore', message='.*Triton is not supported.*')

_empty, _empty_like, _new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _from_kernels() -> bool:
    # allocations made by fla_mesa or fla code (not by tests or torch): outputs a kernel must fully write
    frame = inspect.currentframe().f_back.f_back
    module = frame.f_globals.get('__name__', '') if frame is not None else ''
    return module.startswith(('fla_mesa', 'fla.'))


def _poison(x):
    if x.is_floating_point():
        x.fill_(float('nan'))
    elif x.dtype in (torch.int32, torch.int64):
        x.fill_(-(2 ** 30))
    return x


def _nan_empty(*args, **kwargs):
    x = _empty(*args, **kwargs)
    return _poison(x) if _from_kernels() else x


def _nan_empty_like(*args, **kwargs):
    x = _empty_like(*args, **kwargs)
    return _poison(x) if _from_kernels() else x


def _nan_new_empty(self, *args, **kwargs):
    x = _new_empty(self, *args, **kwargs)
    return _poison(x) if _from_kernels() else x


@pytest.fixture(autouse=True)
def no_environment_switches(monkeypatch):
    """
    fla_mesa reads no `FLA_MESA_*` variable: a test that sets one would test one path believing it tests another.
    Checked before `monkeypatch` (set up first, so torn down last) undoes the test's `setenv`.
    """
    yield
    stale = sorted(name for name in os.environ if name.startswith('FLA_MESA_'))
    assert not stale, f"{stale} set: fla_mesa reads no such switch (the PyTorch chunk path: tests.utils.torch_chunk_path)"


@pytest.fixture(autouse=True)
def nan_poison_empty(monkeypatch):
    """Every tensor that fla_mesa/fla allocates with `empty` starts as NaN, so an unwritten output fails."""
    monkeypatch.setattr(torch, 'empty', _nan_empty)
    monkeypatch.setattr(torch, 'empty_like', _nan_empty_like)
    monkeypatch.setattr(torch.Tensor, 'new_empty', _nan_new_empty)
    yield


if is_interpreting():
    # fla's kernels made runnable in the interpreter, once for the session (tests/interpret.py)
    from tests.interpret import interpret_compat
    interpret_compat()
    # every kernel's loads and stores checked against the tensors it was given (tests/bounds.py)
    from tests import bounds
    bounds.install()
