# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Accuracy against a float64 exact solve, as in shared docs' baseline: bf16 q/k/v, fp32 g/beta/lamb, the reference
computed in float64 from the same rounded inputs; relative error ‖x − ref‖/‖ref‖ of o and of every gradient, at
several upstream-gradient scales (the standard deviation of `do`). Compares fla-mesa with fla's chunk_mesa_net.

    python benchmarks/accuracy.py [--T 256 --H 4 --D 128] [--device cuda]
"""

import argparse

import torch
import torch.nn.functional as F

from fla_mesa.ops.mesa import chunk_mesa, naive_exact_mesa

GRADS = ['dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb']


def make(B, T, H, D, gate_mu, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen).bfloat16() for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + gate_mu)
    beta = torch.rand(B, T, H, generator=gen)
    lamb = F.softplus(torch.rand(H, D, generator=gen)) + 0.25
    return [x.to(device) for x in (q, k, v, g, beta, lamb)]


def grads_of(fn, inputs, do, dtype=None):
    leaves = [(x.to(dtype) if dtype else x).detach().clone().requires_grad_() for x in inputs]
    o = fn(*leaves)
    (o.float() * do.to(o.device, torch.float32)).sum().backward() if dtype is None else (o * do.to(o)).sum().backward()
    return [o.detach()] + [x.grad for x in leaves]


def rel(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return float('nan') if not torch.isfinite(x).all() else ((x - ref).norm() / ref.norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--B', type=int, default=1)
    p.add_argument('--T', type=int, default=256)
    p.add_argument('--H', type=int, default=4)
    p.add_argument('--D', type=int, default=128)
    p.add_argument('--scales', type=float, nargs='+', default=[1, 1e-3, 1e-5, 1e-6, 1e-8])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()

    ops = {
        'fla-mesa 30 steps': lambda *x: chunk_mesa(*x, cg_max_steps=30, cg_tol=None, use_qk_l2norm_in_kernel=True)[0],
        'fla-mesa tol 1e-4': lambda *x: chunk_mesa(*x, cg_max_steps=30, cg_tol=1e-4, use_qk_l2norm_in_kernel=True)[0],
        'fla-mesa tol 1e-6': lambda *x: chunk_mesa(*x, cg_max_steps=60, cg_tol=1e-6, use_qk_l2norm_in_kernel=True)[0],
    }
    try:
        from fla.ops.mesa_net import chunk_mesa_net
        if args.device == 'cuda':
            ops['fla chunk_mesa_net 30'] = lambda *x: chunk_mesa_net(
                *x, max_CG_iteration=30, use_qk_l2norm_in_kernel=True)[0]
    except ImportError:
        pass

    print(f"B={args.B} T={args.T} H={args.H} D={args.D}, bf16 q/k/v, device {args.device}; "
          f"relative error against float64 exact solve of the same inputs")
    print(f"| gates | op | upstream scale | o | " + " | ".join(GRADS) + " |")
    print("|---|---|---|---|" + "---|" * len(GRADS))
    for gate_mu, gate_name in ((4.0, 'γ≈0.98'), (8.0, 'γ≈0.9997')):
        inputs = make(args.B, args.T, args.H, args.D, gate_mu, args.device)
        cpu64 = [x.double().cpu() for x in inputs]
        for scale in args.scales:
            gen = torch.Generator().manual_seed(1)
            do = torch.randn(args.B, args.T, args.H, args.D, generator=gen, dtype=torch.float64) * scale
            exact = lambda *x: naive_exact_mesa(*x, use_qk_l2norm_in_kernel=True)[0]  # noqa: E731
            ref = grads_of(exact, cpu64, do, torch.float64)
            # the floor any bf16-in/bf16-out op has: autograd hands a bf16 output a bf16 `do`, and o, dq, dk, dv
            # are rounded to bf16
            floor = grads_of(exact, cpu64, do.bfloat16().double(), torch.float64)
            floor = [x.to(y.dtype).double() for x, y in zip(floor, [inputs[0]] + inputs)]
            errs = [rel(a, b) for a, b in zip(floor, ref)]
            print(f"| {gate_name} | bf16 rounding floor | {scale:g} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
            for name, fn in ops.items():
                try:
                    out = grads_of(fn, inputs, do)
                    errs = [rel(a, b) for a, b in zip(out, ref)]
                    print(f"| {gate_name} | {name} | {scale:g} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
                except Exception as e:  # a failing row must not hide the others
                    print(f"| {gate_name} | {name} | {scale:g} | n/a: {type(e).__name__}: {str(e)[:80]} |")


if __name__ == '__main__':
    main()
