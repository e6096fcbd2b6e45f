# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The op's forward and forward+backward with both CG kernels pinned to one (NR, num_warps) at a time, the autotune
list's and others (16 warps, 64 rows a program): do_bench median ms at the chunk table's shape (B = 2, T = 8192,
H = 16, D = 128) and the small model's (B = 8, T = 2048, H = 8), bf16, cg_tol 1e-4, 'auto', `benchmark_chunk.py`'s
inputs; and the largest difference of o and every gradient from the first config's, relative to its largest entry.

    python benchmarks/tools/cg_configs.py --compile-only --cfgs 3 &     # one process a config, in parallel, first
    python benchmarks/tools/cg_configs.py
    TRITON_INTERPRET=1 python benchmarks/tools/cg_configs.py --device cpu --cfgs 0 3   # smoke run, tiny shapes
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
from tests.gpu_configs import autotuner, gpu_configs  # noqa: E402

# (NR, num_warps[, maxnreg]) beyond the autotune list's (`chunk_cg._cg_configs`, which come first). A register cap
# of 128 at 8 warps fits two programs on an SM (65536 registers), at the price of spills
EXTRA = [(2, 16), (4, 16), (1, 16), (1, 8), (2, 8, 128), (4, 8, 128)]
SHAPES = {'table': (2, 8192, 16, 128), 'model': (8, 2048, 8, 128)}
CPU_SHAPES = {'table': (1, 100, 2, 32), 'model': (1, 70, 2, 16)}


def pin(nr, num_warps, maxnreg=None):
    from fla_mesa.ops.mesa import chunk_cg
    for kernel in (chunk_cg.chunk_mesa_fwd_kernel_cg, chunk_cg.chunk_mesa_bwd_kernel_cg):
        tuner = autotuner(kernel)
        tuner.configs = [triton.Config({'NR': nr}, num_warps=num_warps, num_stages=1, maxnreg=maxnreg)]
        tuner.cache.clear()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--cfgs', type=int, nargs='+', default=None,
                   help="indices into the autotune list's configs followed by EXTRA (default: all)")
    p.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    p.add_argument('--compile-only', action='store_true')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    a = p.parse_args()
    if a.device == 'cpu':
        from tests.interpret import interpret_compat
        interpret_compat()
    from fla_mesa.ops.mesa import chunk_mesa
    configs = [(c.kwargs['NR'], c.num_warps) for c in gpu_configs()['cg'][1]] + EXTRA
    print('| shape | NR, warps[, maxnreg] | fwd ms | fwd+bwd ms | difference |\n|---|---|---|---|---|', flush=True)
    for shape in a.shapes:
        leaves = [x.requires_grad_() for x in make_inputs(*(CPU_SHAPES if a.device == 'cpu' else SHAPES)[shape],
                                                          a.device)]
        do = torch.randn_like(leaves[2])

        def fwd():
            return chunk_mesa(*leaves, cg_max_steps=30, cg_tol=1e-4)[0]

        def fwd_bwd():
            for x in leaves:
                x.grad = None
            fwd().backward(do)
        ref = None
        for i in (range(len(configs)) if a.cfgs is None else a.cfgs):
            pin(*configs[i])
            fwd_bwd()
            if a.compile_only:
                continue
            outs = [fwd().detach().float()] + [x.grad.float() for x in leaves]
            ref = ref or outs
            diff = max(((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for o, r in zip(outs, ref))
            ms = ['-', '-'] if a.device == 'cpu' else [f"{triton.testing.do_bench(f, warmup=30, rep=300):.3f}"
                                                     for f in (fwd, fwd_bwd)]
            print(f"| {shape} | {', '.join(map(str, configs[i]))} | {ms[0]} | {ms[1]} | {diff:.1e} |", flush=True)


if __name__ == '__main__':
    main()
