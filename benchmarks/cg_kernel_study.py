# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The CG kernel alone, config by config: milliseconds at 0, 1 and 30 steps and at cg_tol=1e-4 (B·T=16384, H=16,
D=128, bf16 inputs, readout fused), registers and spills of each compiled config, and the relative difference of o
to the tf32x3 result (a sanity check; accuracy against float64 is benchmark_chunk.py's job).

    python benchmarks/cg_kernel_study.py [--precisions tf32x3 bf16x3 bf16] [--T 4096]
"""

from __future__ import annotations

import argparse
import os
import sys

import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_chunk import bench, cg_flops_per_step, header, make_inputs, ours_prepare, single_config  # noqa: E402


def compiled_info(kernel):
    """(registers, spills) of the kernel compiled last."""
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    for cache in fn.device_caches.values():
        kernels = list(cache[0].values())
        if kernels:
            k = kernels[-1]
            k._init_handles()
            return k.n_regs, k.n_spills
    return None, None


def main():
    from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg, chunk_mesa_cg_fwd_kernel
    p = argparse.ArgumentParser()
    p.add_argument('--precisions', nargs='+', default=['tf32x3', 'bf16x3', 'bf16'])
    p.add_argument('--configs', nargs='+', default=['1:4', '1:8', '2:4', '2:8', '4:4', '4:8'], help='NR:num_warps')
    p.add_argument('--T', type=int, default=4096)
    p.add_argument('--tokens', type=int, default=16384)
    args = p.parse_args()
    print('# ' + header())
    B, T = max(args.tokens // args.T, 1), args.T
    q, k, v, g, beta, lamb = make_inputs(B, T, 16, 128)
    g_cum, h_kk, h_kv = ours_prepare(q, k, v, g, beta, lamb)
    beta, lamb = beta.float(), lamb.float()
    flops = cg_flops_per_step(B, T, 16, 128)
    print(f"\nB={B} T={T} H=16 D=128; CG FLOPs per step {flops / 1e9:.1f} G\n")
    print("| precision | NR | warps | regs | spills | ms 0 steps | ms 1 step | ms 30 steps | ms/step | TFLOP/s | ms tol 1e-4 "
          "| o diff vs tf32x3 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = None
    for prec in args.precisions:
        for cfg in args.configs:
            NR, nw = (int(x) for x in cfg.split(':'))
            restore = single_config(chunk_mesa_cg_fwd_kernel, triton.Config({'NR': NR}, num_warps=nw, num_stages=1))
            row = [prec, str(NR), str(nw)]
            try:
                def run(steps, tol):
                    return chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, steps, tol, True, v=v, h_kv=h_kv, precision=prec)
                o = run(30, None)[2]
                regs, spills = compiled_info(chunk_mesa_cg_fwd_kernel)
                if ref is None:
                    ref = o
                ms = [bench(lambda: run(s, None)) for s in (0, 1, 30)]
                ms_tol = bench(lambda: run(30, 1e-4))
                per = (ms[2] - ms[1]) / 29
                diff = ((o - ref).norm() / ref.norm()).item()
                row += [str(regs), str(spills)] + [f"{m:.3f}" for m in ms] + [f"{per:.4f}", f"{flops / per / 1e9:.0f}",
                                                                            f"{ms_tol:.3f}", f"{diff:.1e}"]
            except Exception as e:
                row.append(f"n/a: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
            restore()
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == '__main__':
    main()
