# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""A Triton kernel compiled for sm_90 on any machine: no GPU needed, Triton's own ptxas (outside the interpreter)."""

import os
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(kernel, types, consts, **options):
    """
    `kernel` (under its autotune/heuristics wrappers) compiled for sm_90 with `types` for its runtime arguments and
    `consts` for its constexprs (those not given, e.g. unused pointers, are None), every pointer 16-byte aligned as
    the runtime specialises them (without it no load is vectorised); `options` as triton.compile takes them.
    """
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    signature = {p.name: types.get(p.name, 'constexpr') for p in fn.params}
    constexprs = {p.name: consts.get(p.name) for p in fn.params if p.name not in types}
    attrs = {(i,): [['tt.divisibility', 16]] for i, p in enumerate(fn.params) if types.get(p.name, '').startswith('*')}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget('cuda', 90, 32), options=options)


def run_apart(script, *args):
    """
    `python -c script args` outside the interpreter (which replaces triton.jit, so `compile_sm90` needs a process of
    its own), with this checkout importable; returns the completed process (stdout, stderr, returncode).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET='0', PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True, env=env)
