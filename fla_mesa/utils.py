# Copyright (c) 2026, fla-mesa contributors. MIT license.

from __future__ import annotations

import builtins
import os
import sys


def is_interpreting() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


class _TensorRange:
    """`range` whose items are 0-d Triton tensors, as in compiled kernels (where `i.to(...)` works)."""

    def __init__(self, *args):
        self.items = builtins.range(*args)

    def __iter__(self):
        import triton.language as tl
        for i in self.items:
            try:
                yield tl.full([], i, tl.int32)
            except Exception:
                # outside a kernel there is no interpreter builder: plain ints
                yield i


def interpret_compat() -> None:
    """
    Lets fla's chunk kernels run under `TRITON_INTERPRET=1`, where two things break them:
    kernel loop variables are Python ints (fla calls `i_t.to(tl.int64)` on them), so `range` in the loaded
    `fla.ops` modules is rebound to yield 0-d tensors; and autotuning needs a GPU driver, so every autotuned
    kernel keeps its first config. Does nothing when compiling for a GPU (the JIT must see the builtin `range`).
    """
    if not is_interpreting():
        return
    from triton.runtime.autotuner import Autotuner
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(('fla.ops', 'fla.modules', 'fla_mesa.ops')):
            continue
        if name.startswith('fla.ops') and getattr(module, 'range', None) is not _TensorRange:
            module.range = _TensorRange
        for obj in list(vars(module).values()):
            while obj is not None and not isinstance(obj, Autotuner) and hasattr(obj, 'fn'):
                obj = obj.fn
            if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                obj.configs = obj.configs[:1]
