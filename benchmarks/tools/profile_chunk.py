# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Where chunk_mesa's time goes: forward and forward+backward under torch.profiler, CUDA time per kernel (ms per call,
averaged over the profiled iterations; a kernel launched more than once an iteration listed per launch), at
B·T = 16384, H = 16, D = 128, bf16, the inputs of benchmark_chunk.py, or on one of benchmark_solver.py's hard families.

    python benchmarks/tools/profile_chunk.py [--T 4096] [--modes steps30 tol] [--pin-config 0]
    python benchmarks/tools/profile_chunk.py --T 8192 --family '8 directions' --modes tol tol_chunk
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark_chunk import header, make_inputs  # noqa: E402

MODES = {
    'steps30': dict(cg_max_steps=30, cg_tol=None, check_values=False),
    'tol': dict(cg_max_steps=30, cg_tol=1e-4, check_values=False),
    # the default 'auto' above against Jacobi alone: what 'auto' adds where nothing is routed
    'tol_jacobi': dict(cg_max_steps=30, cg_tol=1e-4, check_values=False, precondition=True),
    # the chunk preconditioner alone (every chunk), beside 'auto' on the hard families (--family)
    'tol_chunk': dict(cg_max_steps=30, cg_tol=1e-4, check_values=False, precondition='chunk'),
    # the value checks' host sync, as a direct call of the op pays it
    'tol_checked': dict(cg_max_steps=30, cg_tol=1e-4),
}


def kernel_times(fn, iters):
    """{kernel name: (ms per iteration, calls per iteration)} of `fn`, and the wall ms per iteration."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
    times, calls = collections.Counter(), collections.Counter()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    for e in events:
        calls[e.name] += 1
    # a kernel launched c times an iteration is listed per launch: `name #i` the i-th launch of each iteration
    seen = collections.Counter()
    for e in events:
        c = calls[e.name] // iters
        key = e.name if c <= 1 else f"{e.name} #{seen[e.name] % c + 1}"
        seen[e.name] += 1
        times[key] += e.device_time_total / 1e3
    return {n: (t / iters, 1 if '#' in n else calls[n] / iters) for n, t in times.items()}, \
        start.elapsed_time(end) / iters


def main():
    from fla_mesa.ops.mesa import chunk_mesa
    p = argparse.ArgumentParser()
    p.add_argument('--T', type=int, default=4096)
    p.add_argument('--tokens', type=int, default=16384)
    p.add_argument('--modes', nargs='+', default=list(MODES), choices=list(MODES))
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--family', default=None, help="a hard family of tests/ops/test_hard_states.py instead of the "
                   "chunk table's inputs, e.g. '8 directions'")
    p.add_argument('--pin-config', type=int, default=None,
                   help="every chunk kernel at this config (no autotuning: one compile each)")
    args = p.parse_args()
    if args.pin_config is not None:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from tests.gpu_configs import pin_all
        pin_all(args.pin_config)
    print('# ' + header())
    B, T = max(args.tokens // args.T, 1), args.T
    if args.family is None:
        inputs = make_inputs(B, T, 16, 128)
    else:
        # benchmark_solver.py's hard family: B = 1, H = 4, K = V = 128, float32
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from tests.ops.test_hard_states import FAMILIES, hard_inputs
        inputs = [x.to('cuda', torch.float32) for x in hard_inputs(T, H=4, K=128, V=128, **FAMILIES[args.family])]
        B = 1
    for t in inputs:
        t.requires_grad_(True)
    do = torch.randn_like(inputs[2])
    for mode in args.modes:
        kw = MODES[mode]

        def fwd():
            with torch.no_grad():
                return chunk_mesa(*inputs, **kw)

        def fwdbwd():
            o, _ = chunk_mesa(*inputs, **kw)
            torch.autograd.grad(o, inputs, do)

        for name, fn in [('fwd', fwd), ('fwd+bwd', fwdbwd)]:
            table, wall = kernel_times(fn, args.iters)
            total = sum(t for t, _ in table.values())
            where = f"B={B} T={T}" + ('' if args.family is None else f", {args.family}")
            print(f"\n## {mode} {name}: {where}; {wall:.2f} ms per iteration (events), kernels sum {total:.2f} ms\n")
            print("| kernel | ms | calls | share |")
            print("|---|---|---|---|")
            for n, (t, c) in sorted(table.items(), key=lambda kv: -kv[1][0]):
                if t >= 0.005:
                    print(f"| {n[:90]} | {t:.3f} | {c:g} | {t / total:.0%} |")


if __name__ == '__main__':
    main()
