# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
What 'auto''s first CG pass costs over Jacobi alone, kernel by kernel: `chunk_mesa_cg` called directly, forward
and adjoint, with Jacobi, Jacobi with the unconverged flags, and the first pass of 'auto' (flags, the map's mark
read and its mark written), each CG kernel pinned to one config at a time (do_bench median, ms). B = 2, T = 8192,
H = 16, D = 128, bf16, cg_tol 1e-4, `benchmark_chunk.py`'s inputs (random keys: nothing routed or rescued).

    python benchmarks/tools/first_pass_cost.py [--configs 0 1 2]
    python benchmarks/tools/first_pass_cost.py --configs 1 --compile-only     # one process per config, in parallel
    TRITON_INTERPRET=1 python benchmarks/tools/first_pass_cost.py --device cpu --configs 0   # smoke run
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

VARIANTS = ['jacobi', 'jacobi_flag', 'first']


def solves(device):
    from fla_mesa.ops.mesa.chunk import _prepare
    from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
    B, T, H, D = (1, 130, 2, 32) if device == 'cpu' else (2, 8192, 16, 128)
    q, k, v, g, beta, lamb = make_inputs(B, T, H, D, device)
    do = torch.randn_like(v)
    _, g_cum, beta, h_kk, h_kv, _ = _prepare(k, v, g, beta, None, None, 64)
    need = torch.zeros(h_kk.shape[0] * h_kk.shape[1], H, dtype=torch.int32, device=device)
    args = (k, g_cum, beta, lamb.float(), h_kk, 30, 1e-4, True)
    extra = {'jacobi': {}, 'jacobi_flag': dict(flag_unconverged=True),
             'first': dict(flag_unconverged=True, _need=need)}
    out = {}
    for name, kw in extra.items():
        out[f'forward {name}'] = lambda kw=kw: chunk_mesa_cg(q, *args, v=v, h_kv=h_kv, o_dtype=v.dtype, **kw)
        out[f'adjoint {name}'] = lambda kw=kw: chunk_mesa_cg(None, *args, v=v, h_kv=h_kv, do=do, **kw)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--configs', type=int, nargs='+', default=[0, 1, 2], help='CG kernel configs (GPU list indices)')
    p.add_argument('--compile-only', action='store_true')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    a = p.parse_args()
    if a.device == 'cpu':
        from tests.interpret import interpret_compat
        interpret_compat()
    fns = solves(a.device)
    cfgs = gpu_configs()
    print('| CG config | solve | ms |\n|---|---|---|', flush=True)
    for i in a.configs:
        for key in ('cg', 'cg_bwd'):
            tuner, configs = cfgs[key]
            pin(tuner, configs[i % len(configs)])
        for name, fn in fns.items():
            fn()
            if a.compile_only or a.device == 'cpu':
                continue
            torch.cuda.synchronize()
            print(f"| {i} | {name} | {triton.testing.do_bench(fn, warmup=50, rep=300):.4f} |", flush=True)


if __name__ == '__main__':
    main()
