# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Makes fla's Triton kernels (and fla-mesa's) runnable under `TRITON_INTERPRET=1`, for the tests (`conftest.py`) and the
CPU smoke runs of the benchmarks. Not part of the package: it rebinds names inside fla's modules, which no library
should do to its user's fla.
"""

import builtins
import sys

from fla_mesa.utils import is_interpreting


class TensorRange:
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
    Two things break fla's kernels under the interpreter: kernel loop variables are Python ints there (fla calls
    `i_t.to(tl.int64)` on them), so `range` in fla's kernel modules is rebound to yield 0-d tensors; and autotuning
    needs a GPU driver, so every autotuned kernel of fla and fla-mesa keeps its first config. Every fla module is
    imported first (`import fla` loads them all), so one call covers what runs later. Does nothing when compiling for
    a GPU (the JIT must see the builtin `range`).
    """
    if not is_interpreting():
        return
    from tests.gpu_configs import loaded_autotuners
    tuners = loaded_autotuners(('fla.ops', 'fla.modules', 'fla_mesa.ops'))
    for name, module in list(sys.modules.items()):
        if module is not None and name.startswith('fla.ops') and getattr(module, 'range', None) is not TensorRange:
            module.range = TensorRange
    for tuner in tuners:
        if len(tuner.configs) > 1:
            tuner.configs = tuner.configs[:1]
    _patch_language_once_a_launch()


def _patch_language_once_a_launch() -> None:
    """
    The interpreter swaps triton.language's builtins for interpreted ones when a kernel launches, and again at every
    call of a `@triton.jit` helper inside it, in every program: a scan of the language's modules each time (a large
    share of the tests' time in kernels built from helpers). Inside a launch the helper's modules are already
    swapped, so the helper's own swap changes nothing (its scan finds no builtin left to swap): it is skipped. A
    helper that sees a language module the launch did not swap still swaps it. Triton's interpreter without these
    names is left alone.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, '_patch_lang', None)
    if original is None or getattr(original, 'once_a_launch', False):
        return
    # the language modules swapped in the running launch (launches do not nest; a launch's end restores them all)
    swapped = set()

    class Scope:
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            swapped.clear()
            if self.scope is not None:
                self.scope.restore()

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is interpreter.tl or v is interpreter.tl.core}
        if langs and langs <= swapped:
            return Scope(None)
        scope = original(fn)
        swapped.update(langs)
        return Scope(scope)

    patch_lang.once_a_launch = True
    interpreter._patch_lang = patch_lang
