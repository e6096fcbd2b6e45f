# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
What a CG kernel costs before its first step, and what a step costs: `chunk_mesa_cg` called directly (Jacobi, both CG
kernels pinned to the autotune list's first config), forward (with and without the readout pass after it) and
adjoint, at `max_steps` 0, 1, 2, 4 and at cg_tol 1e-4; do_bench median ms and the mean over 32-row tiles of the
tile's most steps (a tile runs as long as its slowest row). `benchmark_chunk.py`'s inputs (random keys), bf16, at
the chunk table's shape (B = 2, T = 8192, H = 16, D = 128) and the small model's (B = 8, T = 2048, H = 8).

    python benchmarks/tools/cg_fixed_cost.py --compile-only --shapes table &   # one process a shape, first
    python benchmarks/tools/cg_fixed_cost.py
    TRITON_INTERPRET=1 python benchmarks/tools/cg_fixed_cost.py --device cpu   # smoke run, a tiny shape
"""

import argparse
import os
import sys

import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
from benchmark_chunk import make_inputs  # noqa: E402
from tests.gpu_configs import gpu_configs, pin  # noqa: E402

SHAPES = {'table': (2, 8192, 16, 128), 'model': (8, 2048, 8, 128)}
RUNS = [(0, None), (1, None), (2, None), (4, None), (30, 1e-4)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    p.add_argument('--compile-only', action='store_true')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    a = p.parse_args()
    if a.device == 'cpu':
        from tests.interpret import interpret_compat
        interpret_compat()
    from fla_mesa.ops.mesa.chunk import _prepare
    from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
    configs = gpu_configs()
    for key in ('cg', 'cg_bwd'):
        pin(configs[key][0], configs[key][1][0])
    print('| shape | solve | max steps, cg_tol | ms | mean tile steps |\n|---|---|---|---|---|', flush=True)
    for shape in a.shapes:
        B, T, H, D = (1, 128, 2, 32) if a.device == 'cpu' else SHAPES[shape]
        q, k, v, g, beta, lamb = make_inputs(B, T, H, D, a.device)
        do = torch.randn_like(v)
        _, g_cum, beta, h_kk, h_kv, _ = _prepare(k, v, g, beta, None, None, 64)
        args = (k, g_cum, beta, lamb.float(), h_kk)
        solves = {
            'forward': lambda n, tol: chunk_mesa_cg(q, *args, n, tol, True, v=v, h_kv=h_kv, o_dtype=v.dtype),
            'forward, no readout': lambda n, tol: chunk_mesa_cg(q, *args, n, tol, True),
            'adjoint': lambda n, tol: chunk_mesa_cg(None, *args, n, tol, True, v=v, h_kv=h_kv, do=do),
        }
        for n, tol in RUNS:
            for name, solve in solves.items():
                def fn():
                    return solve(n, tol)
                steps = fn()[1]
                tile = steps.float().view(B, T // 32, 32, H).amax(2).mean().item()
                if a.compile_only:
                    continue
                ms = '-' if a.device == 'cpu' else f"{triton.testing.do_bench(fn, warmup=20, rep=200):.3f}"
                print(f"| {shape} | {name} | {n}, {tol} | {ms} | {tile:.2f} |", flush=True)


if __name__ == '__main__':
    main()
