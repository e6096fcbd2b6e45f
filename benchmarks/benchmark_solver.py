# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The solver study of issue 14 (item 4): plain CG, Jacobi PCG, the chunk preconditioner ('chunk') and 'auto'
(Jacobi, then 'chunk' for the tokens Jacobi leaves unconverged).

1. Per method, on the hard families of `tests/ops/test_hard_states.py` (keys from a few directions, γ near 1,
   anisotropic keys, softplus Λ) and on benign random states: mean CG steps a token, the share at `cg_max_steps`,
   the relative error of the last 4 tokens' output against a float64 direct solve (float32 inputs, defaults
   `cg_max_steps=30, cg_tol=1e-4`; the float32 floor, a float32 direct solve, beside it), and the time of the forward
   and of forward+backward.
2. The chunk table's shape (B·T = 16384, H = 16, D = 128, bf16, `benchmark_chunk.py`'s inputs) at T = 2048 and 8192:
   Jacobi against 'chunk' and 'auto', forward and forward+backward, and the factorisation alone (the Triton path's kernel, and
   torch's float64 `precond.chunk_start_factor`).
3. Long states (T = 32768 on the GPU, γ = 1 or 0.9999, few key directions), float32 and bf16 q/k/v: steps, the last
   tokens' error against float64 beside the float32 floor (both computed on the CPU, on any device), and whether the
   output and every gradient are finite.

    python benchmarks/benchmark_solver.py --device cuda            # H200: a few minutes, compiles included
    python benchmarks/benchmark_solver.py --device cpu             # smoke run: the PyTorch path, small shapes

Writes `benchmarks/results/solver_<device>.md` (or `--out`). On the GPU the CG kernel is pinned to one config
(`--autotune` autotunes it: three configs per preconditioner and shape to compile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import benchmark_chunk  # noqa: E402
from tests.ops.test_hard_states import FAMILIES, hard_inputs, last_outputs  # noqa: E402

METHODS = {'plain': False, 'jacobi': True, 'chunk': 'chunk', 'auto': 'auto'}


def timed(fn, device):
    if device == 'cuda':
        import triton
        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode='median')
    fn()
    t0 = time.time()
    fn()
    return (time.time() - t0) * 1e3


def fwd_bwd(fn, inputs):
    """A forward+backward of `fn` to time, as benchmark_chunk.py times it: leaves and an upstream gradient made once,
    so that the time is the op's alone (no clones, casts or reductions inside)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    do = torch.randn(fn(*leaves).shape, generator=torch.Generator().manual_seed(0)).to(inputs[2])
    return lambda: fn(*leaves).backward(do)


def adjoint_steps(inputs, precondition, skip=True):
    """Mean CG steps a token of the backward's adjoint solve (upstream gradient ones), on the op's path; with 'auto',
    `skip=False` leaves out the forward's rescued chunks, which the adjoint otherwise starts past Jacobi."""
    from fla_mesa.ops.mesa import chunk
    from fla_mesa.ops.mesa.chunk_torch import chunk_mesa_bwd_torch, chunk_mesa_fwd_torch
    q, k, v, g, beta, lamb = inputs
    triton = chunk._use_triton_path(q)
    fwd, bwd = (chunk.chunk_mesa_fwd, chunk.chunk_mesa_bwd) if triton else (chunk_mesa_fwd_torch, chunk_mesa_bwd_torch)
    args = (30, 1e-4, precondition, None, 64)
    _, x, _, _, rescued = fwd(q, k, v, g, beta, lamb, None, *args)
    steps = bwd(x, torch.ones_like(v), None, k, v, g, beta, lamb, None, *args, rescued=rescued if skip else None)[-1]
    return steps.float().mean().item()


def family_table(args, lines):
    from fla_mesa.ops.mesa import chunk_mesa
    T, H, K = args.family_T, args.family_H, args.family_K
    lines += [f"## 1. Hard families and benign states: B = 1, T = {T}, H = {H}, K = V = {K}, float32, defaults "
              "(cg_max_steps 30, cg_tol 1e-4)", "",
              "steps: mean a token (both solves for 'auto') / share unconverged (stopped above cg_tol); error: the "
              "last 4 tokens' o against float64; time in ms "
              f"({'do_bench median' if args.device == 'cuda' else 'one call'}); adjoint steps: the backward's solve, "
              "mean a token ('auto': in brackets without its skip of the forward's rescued chunks).", "",
              "| family | float32 floor | method | steps | unconverged | o error | fwd ms | fwd+bwd ms | adjoint steps |",
              "|---|---|---|---|---|---|---|---|---|"]
    families = dict(FAMILIES)
    families['benign: random keys, γ = 0.98, Λ = 0.25'] = dict(dirs=0, gamma=0.98)
    for name, kw in families.items():
        # the reference and the floor on the CPU, as in long_table
        inputs64 = hard_inputs(T, H=H, K=K, V=K, **kw)
        ref = last_outputs(*inputs64)
        floor = benchmark_chunk.rel(last_outputs(*[x.float() for x in inputs64]), ref)
        inputs, ref = [x.to(args.device, torch.float32) for x in inputs64], ref.to(args.device)
        for method, pc in METHODS.items():
            if method not in args.methods:
                continue
            try:
                o, _, steps, bad = chunk_mesa(*inputs, precondition=pc, return_cg_steps=True,
                                              return_cg_unconverged=True, check_values=False)
                steps = steps.float()
                err = benchmark_chunk.rel(o[:, -ref.shape[1]:], ref)
                t_f = timed(lambda: chunk_mesa(*inputs, precondition=pc, check_values=False), args.device)
                t_b = timed(fwd_bwd(lambda *x: chunk_mesa(*x, precondition=pc, check_values=False)[0], inputs),
                            args.device)
                adj = f"{adjoint_steps(inputs, pc):.2f}"
                if pc == 'auto':
                    adj += f" ({adjoint_steps(inputs, pc, skip=False):.2f})"
                row = (f"{steps.mean():.2f} | {bad.float().mean() * 100:.0f}% | {err:.1e} | {t_f:.2f} | "
                       f"{t_b:.2f} | {adj}")
            except Exception as e:
                traceback.print_exc()
                row = f"n/a ({benchmark_chunk.short(e)}) | | | | |"
            lines.append(f"| {name} | {floor:.1e} | {method} | {row} |")
            print(lines[-1], flush=True)
    lines.append("")


LONG_FAMILIES = {
    '4 directions + noise 1e-2, γ = 1': dict(dirs=4, noise=1e-2, gamma=1.0),
    '8 directions, γ = 0.9999': dict(dirs=8, gamma=0.9999),
    '1 direction, γ = 1': dict(dirs=1, gamma=1.0),
}


def long_table(args, lines):
    """Issue 14's long states: the last tokens' o against float64 (the float32 floor beside it) and whether o and every
    gradient are finite, for float32 and bf16 q/k/v (g, β, Λ in float32)."""
    from fla_mesa.ops.mesa import chunk_mesa
    T, H, K = args.long_T, args.family_H, args.family_K
    lines += [f"## 3. Long states: B = 1, T = {T}, H = {H}, K = V = {K}, β = 0.99, Λ = 0.25, cg_max_steps 30", "",
              "| family | q/k/v | method | cg_tol | steps | unconverged | o error | float32 floor | o finite | grads finite |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, kw in LONG_FAMILIES.items():
        # the reference and the float32 floor on the CPU, whatever the device: the floor depends on the order in
        # which its float32 states are summed (cuBLAS's is not the CPU's), and so would not be comparable across devices
        inputs64 = hard_inputs(T, H=H, K=K, V=K, **kw)
        for dtype in (torch.float32, torch.bfloat16):
            rounded = [x.to(dtype).double() if i < 3 else x for i, x in enumerate(inputs64)]
            ref = last_outputs(*rounded)
            floor = benchmark_chunk.rel(last_outputs(*[x.float() for x in rounded]), ref)
            for method, tol in [(m, tol) for m in args.methods for tol in args.long_tols]:
                leaves = [x.to(args.device, dtype if i < 3 else torch.float32).requires_grad_()
                          for i, x in enumerate(inputs64)]
                o, _, steps, bad = chunk_mesa(*leaves, precondition=METHODS[method], cg_tol=tol, return_cg_steps=True,
                                              return_cg_unconverged=True, check_values=False)
                (o.float() * torch.randn_like(o, dtype=torch.float32)).sum().backward()
                finite = all(torch.isfinite(x.grad).all().item() for x in leaves)
                steps = steps.float()
                lines.append(f"| {name} | {str(dtype)[6:]} | {method} | {tol:g} | {steps.mean():.2f} | "
                             f"{bad.float().mean() * 100:.0f}% | "
                             f"{benchmark_chunk.rel(o[:, -ref.shape[1]:], ref):.1e} | {floor:.1e} | "
                             f"{torch.isfinite(o).all().item()} | {finite} |")
                print(lines[-1], flush=True)
    lines.append("")


def chunk_table(args, lines):
    from fla_mesa.ops.mesa import chunk_mesa
    from fla_mesa.ops.mesa import chunk_cg
    from fla_mesa.ops.mesa.precond import chunk_start_factor
    saved = chunk_cg.FACTOR_DTYPE
    H, D = 16, args.D
    lines += [f"## 2. The chunk table's shape: B·T = {args.tokens}, H = {H}, D = {D}, bf16 q/k/v "
              "(benchmark_chunk.py's inputs, cg_tol 1e-4)", "",
              "| T | method | mean steps | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
    for T in args.Ts:
        B = max(args.tokens // T, 1)
        inputs = benchmark_chunk.make_inputs(B, T, H, D, device=args.device)
        for method in ('jacobi', 'chunk', 'chunk, bf16 W', 'auto'):
            if method.split(',')[0] not in args.methods:
                continue
            pc = METHODS[method.split(',')[0]]
            # 'bf16 W': the factor stored in bfloat16 (`precond.FACTOR_DTYPE`; the PyTorch path keeps its own dtype)
            chunk_cg.FACTOR_DTYPE = torch.bfloat16 if method.endswith('bf16 W') else saved
            try:
                _, _, steps = chunk_mesa(*inputs, precondition=pc, return_cg_steps=True, check_values=False)
                t_f = timed(lambda: chunk_mesa(*inputs, precondition=pc, check_values=False), args.device)
                t_b = timed(fwd_bwd(lambda *x: chunk_mesa(*x, precondition=pc, check_values=False)[0], inputs),
                            args.device)
                row = f"{steps.float().mean():.2f} | {t_f:.2f} | {t_b:.2f}"
            except Exception as e:
                traceback.print_exc()
                row = f"n/a ({benchmark_chunk.short(e)}) | |"
            lines.append(f"| {T} | {method} | {row} |")
            print(lines[-1], flush=True)
    chunk_cg.FACTOR_DTYPE = saved
    # the factorisation alone, on states of the table's size (forward and backward each build it once)
    NT = args.tokens // 64
    h = torch.randn(1, NT, H, D, D, device=args.device) / D ** 0.5
    h = h @ h.transpose(-1, -2)
    a, lamb = torch.rand(1, NT, H, device=args.device), torch.full((H, D), 0.25, device=args.device)
    # the Triton path's factor kernel (what 'chunk' runs on the GPU), and torch's float64 one it replaced there
    factors = {'torch float64 Cholesky and inverse (precond.chunk_start_factor)': chunk_start_factor}
    if args.device == 'cuda':
        from fla_mesa.ops.mesa.factor import chunk_start_factor_triton
        factors = {'Triton kernel (factor.chunk_start_factor_triton)': chunk_start_factor_triton, **factors}
    for name, fn in factors.items():
        t = timed(lambda: fn(h, a, lamb, torch.float32), args.device)
        lines.append(f"\nthe factorisation alone ({NT * H} matrices {D}x{D}, W in float32), {name}: {t:.2f} ms")
    lines.append("")


def warm(args):
    """Triton compiles one kernel at a time in a process: one process per method and section, at small sizes (the
    binaries do not depend on T or B), fills Triton's on-disk cache for the timed run."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor
    cmd = [sys.executable, os.path.abspath(__file__), '--device', args.device, '--family-T', '256', '--Ts', '256',
           '--tokens', '256', '--long-T', '256', '--out', os.devnull] + (['--autotune'] if args.autotune else [])
    jobs = [cmd + ['--methods', m, '--sections', s] for m in args.methods for s in args.sections]
    t0 = time.time()
    with ThreadPoolExecutor(len(jobs)) as pool:
        codes = list(pool.map(lambda c: subprocess.run(c, capture_output=True).returncode, jobs))
    print(f"warm: {len(jobs)} processes, exit codes {codes}, {time.time() - t0:.0f} s", flush=True)


def gpu_tag():
    name = torch.cuda.get_device_name()
    return next((t.lower() for t in ('H200', 'H100', 'A100') if t in name), 'cuda')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    p.add_argument('--Ts', type=int, nargs='+', default=None, help="chunk table lengths (cuda: 2048 8192)")
    p.add_argument('--tokens', type=int, default=None, help="chunk table B·T (cuda: 16384)")
    p.add_argument('--autotune', action='store_true',
                   help="autotune the chunk kernels instead of pinning each to its first config")
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    p.add_argument('--sections', nargs='+', default=['families', 'table', 'long'],
                   choices=['families', 'table', 'long'])
    p.add_argument('--long-T', type=int, default=None, help="the long states' length (cuda: 32768)")
    p.add_argument('--family-T', type=int, default=None, help="the families' length (cuda: 8192)")
    p.add_argument('--long-tols', type=float, nargs='+', default=[1e-4],
                   help="the long states' cg_tol values (default 1e-4; a smaller one shows where the stopping rule binds)")
    p.add_argument('--warm', action='store_true',
                   help="first compile every method and section in parallel processes at small sizes")
    p.add_argument('--out', default=None)
    args = p.parse_args()
    gpu = args.device == 'cuda'
    if gpu and not torch.cuda.is_available():
        sys.exit("no GPU: use --device cpu")
    # the GPU: the Triton kernels at the study's sizes; the CPU: the PyTorch path at small ones (a smoke run)
    args.family_H, args.family_K = (4, 128) if gpu else (1, 64)
    args.family_T = args.family_T or (8192 if gpu else 1024)
    args.long_T = args.long_T or (32768 if gpu else 2048)
    args.Ts = args.Ts or ([2048, 8192] if gpu else [128, 256])
    args.tokens = args.tokens or (16384 if gpu else 256)
    args.D = 128 if gpu else 32
    benchmark_chunk.DEVICE = args.device
    if gpu and not args.autotune:
        # every chunk kernel at its first config: one binary per variant, the same for every method compared
        from tests.gpu_configs import pin_all
        pin_all(0)
    if args.warm:
        warm(args)
    lines = [f"# benchmarks/benchmark_solver.py --device {args.device}", "", f"# {benchmark_chunk.header()}"
             + ("" if gpu else f"; CPU: {os.cpu_count()} cores, PyTorch path"), ""]
    t0 = time.time()
    if 'families' in args.sections:
        family_table(args, lines)
    if 'table' in args.sections:
        chunk_table(args, lines)
    if 'long' in args.sections:
        long_table(args, lines)
    lines.append(f"Total run time {time.time() - t0:.0f} s.")
    out = args.out or os.path.join(ROOT, 'benchmarks', 'results', f"solver_{gpu_tag() if gpu else 'cpu'}.md")
    with open(out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f"wrote {out}")


if __name__ == '__main__':
    main()
