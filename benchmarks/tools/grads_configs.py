# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The gradient kernel (`chunk_mesa_bwd_grads`, its reverse state pass included) pinned to one config at a time, the
autotune list's and candidates beside them: do_bench median ms, and the largest difference of dk, dv, dg, dβ, dλ
from the list's config (64, 32, 4 warps, 1 stage), relative to its largest entry (one bf16 ulp of dk or dv shows as
~3e-3). B = 2, T = 8192, H = 16, D = 128, bf16 k/v/do, x and e random (the kernel's time does not depend on them).
Compile first, one process per config in parallel (`--compile-only --configs I`), then time them all in one.

    python benchmarks/tools/grads_configs.py [--configs 0 2 5]
    TRITON_INTERPRET=1 python benchmarks/tools/grads_configs.py --device cpu --configs 2 5   # smoke run
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
from tests.gpu_configs import autotuner, gpu_configs, pin  # noqa: E402

# (BK = BV, BC, warps, stages)
CONFIGS = [(32, 32, 4, 1), (32, 32, 8, 1), (64, 32, 4, 1), (64, 32, 8, 1), (64, 16, 8, 1),
           (64, 32, 4, 2), (64, 32, 8, 2), (64, 16, 8, 2), (64, 16, 4, 1), (64, 16, 4, 2), (64, 32, 4, 3),
           (64, 32, 4, 4)]
BASE = 2


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--configs', type=int, nargs='+', default=list(range(len(CONFIGS))), help='indices of CONFIGS')
    p.add_argument('--compile-only', action='store_true')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    a = p.parse_args()
    if a.device == 'cpu':
        from tests.interpret import interpret_compat
        interpret_compat()
    from fla_mesa.ops.mesa import chunk_bwd
    from fla_mesa.ops.mesa.chunk import _prepare
    states, state_configs = gpu_configs()['states']
    pin(states, state_configs[0])
    B, T, H, D = (1, 130, 2, 32) if a.device == 'cpu' else (2, 8192, 16, 128)
    q, k, v, g, beta, lamb = make_inputs(B, T, H, D, a.device)
    gen = torch.Generator(device=a.device).manual_seed(1)
    x, e = (0.1 * torch.randn(B, T, H, D, device=a.device, generator=gen) for _ in range(2))
    do = torch.randn(B, T, H, D, device=a.device, generator=gen).to(v.dtype)
    _, g_cum, beta, h_kk, h_kv, _ = _prepare(k, v, g, beta, None, None, 64)
    tuner = autotuner(chunk_bwd.chunk_mesa_bwd_kernel_grads)

    def fn():
        return chunk_bwd.chunk_mesa_bwd_grads(x, e, do, k, v, g_cum, beta, h_kk, h_kv, chunk_size=64)
    base = None
    print('| config (BK = BV, BC, warps, stages) | ms | largest difference from the base config |\n|---|---|---|',
          flush=True)
    for i in [BASE] + [c for c in a.configs if c != BASE]:
        bk, bc, warps, stages = CONFIGS[i]
        pin(tuner, triton.Config({'BK': bk, 'BV': bk, 'BC': bc}, num_warps=warps, num_stages=stages))
        out = fn()
        if a.compile_only:
            continue
        base = out if base is None else base
        diff = max(((o.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
                   for o, r in zip(out[:5], base[:5]))
        ms = triton.testing.do_bench(fn, warmup=30, rep=200) if a.device == 'cuda' else float('nan')
        print(f'| {CONFIGS[i]} | {ms:.4f} | {diff:.1e} |', flush=True)


if __name__ == '__main__':
    main()
