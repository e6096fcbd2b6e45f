# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Under TRITON_INTERPRET=1: every load and store a kernel makes (its unmasked lanes) must fall inside one of the
tensors it was given. On a GPU such an access reads another allocation or faults (an illegal memory access); the
interpreter reads host memory and would let it pass silently.
"""

import numpy as np
import torch
from triton.runtime import interpreter

_current = {'name': None, 'starts': None, 'ends': None}


def _extent(t: torch.Tensor):
    if t.numel() == 0:
        return None
    lo = sum(min(0, (s - 1) * st) for s, st in zip(t.shape, t.stride()))
    hi = sum(max(0, (s - 1) * st) for s, st in zip(t.shape, t.stride())) + 1
    base = t.data_ptr()
    return base + lo * t.element_size(), base + hi * t.element_size()


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)


def _set_ranges(name, args):
    spans = sorted(e for t in _tensors(args) if (e := _extent(t)) is not None)
    merged = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    _current['name'] = name
    _current['starts'] = np.array([m[0] for m in merged], dtype=np.uint64)
    _current['ends'] = np.array([m[1] for m in merged], dtype=np.uint64)


def _check(kind, ptrs, mask, itemsize):
    addrs = np.asarray(ptrs.data)[np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data))].astype(np.uint64)
    if addrs.size == 0 or _current['starts'] is None:
        return
    starts, ends = _current['starts'], _current['ends']
    idx = np.searchsorted(starts, addrs, side='right').astype(np.int64) - 1
    ok = (idx >= 0) & (addrs + np.uint64(itemsize) <= ends[np.maximum(idx, 0)])
    if not ok.all():
        bad = int(addrs[~ok][0])
        raise IndexError(f"{_current['name']}: out-of-bounds {kind} of {int((~ok).sum())} lanes "
                         f"(first at {bad:#x}; tensors at {[(hex(int(a)), hex(int(b))) for a, b in zip(starts, ends)]})")


def install():
    """Patches the interpreter (idempotent): the kernel's tensors recorded at launch, every access checked."""
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    if getattr(builder, '_fla_mesa_bounds', False):
        return
    init_args, load, store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _set_ranges(getattr(self.fn, '__name__', '?'), (list(args_hst), list(kwargs_hst.values())))
        return args_hst, kwargs_hst

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check('load', ptrs, mask, interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        _check('store', ptrs, mask, interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize)
        return store(self, ptrs, value, mask, cache_policy)

    executor._init_args_hst = _init_args_hst
    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    builder._fla_mesa_bounds = True
