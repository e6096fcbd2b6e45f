# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Rounded CG directions, in PyTorch on the CPU: does rounding each direction p to bf16 (so that A p needs one product
fewer per matmul with split operands) cost steps or accuracy?

Dense per-token systems (H_t + Λ) x_t = q_t built in float64 from the benchmark's inputs (unit-norm bf16 q and k,
g = logsigmoid(N(0,1) + mu), beta = sigmoid(U), lamb = softplus(U) + 0.25, here scaled down to make them
ill-conditioned), solved in float32 by the project's PyTorch CG (`cg_solve`: the kernel's Jacobi PCG): 'plain' as
the kernel without the option (fp32 products), 'rounded' with `round_p`: the start and each direction rounded to
bf16 before A p, x and r moved along the rounded vector, α = rᵀp / pᵀAp the exact line search. Mean and max steps
per token, and the relative error of x against the float64 solve.

    python benchmarks/rounded_directions_study.py
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fla_mesa.ops.mesa.solver import cg_solve  # noqa: E402


def systems(T, H, K, mu, lamb_scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(T, H, K, generator=gen), dim=-1).bfloat16().double()
    k = F.normalize(torch.randn(T, H, K, generator=gen), dim=-1).bfloat16().double()
    g = F.logsigmoid(torch.randn(T, H, generator=gen) + mu).double()
    beta = torch.rand(T, H, generator=gen).sigmoid().double()
    lamb = (F.softplus(torch.rand(H, K, generator=gen)) + 0.25).double() * lamb_scale
    h, A = torch.zeros(H, K, K, dtype=torch.float64), []
    for t in range(T):
        h = g[t].exp()[:, None, None] * h + beta[t][:, None, None] * k[t][:, :, None] * k[t][:, None, :]
        A.append(h + torch.diag_embed(lamb))
    return torch.stack(A).reshape(-1, K, K), q.reshape(-1, K)


def bf16(p):
    return p.bfloat16().float()


def main():
    print("| gates mu | Λ scale | cond median / max | cg_tol, cap | plain steps mean / max | plain err "
          "| rounded steps mean / max | rounded err |")
    print("|---|---|---|---|---|---|---|---|")
    for mu, lamb_scale in ((4.0, 1.0), (8.0, 1.0), (8.0, 0.1), (8.0, 0.01), (8.0, 0.001)):
        A, b = systems(256, 2, 64, mu, lamb_scale)
        cond = torch.linalg.cond(A)
        exact = torch.linalg.solve(A, b[..., None])[..., 0]
        A32 = A.float()
        for tol, cap in ((1e-4, 30), (0.0, 30), (0.0, 200)):
            cells = []
            for rounded in (False, True):
                x, n = cg_solve(lambda p: (A32 @ p[..., None])[..., 0], b.float(), torch.diagonal(A32, dim1=-2, dim2=-1),
                                cap, tol or None, precondition=True, round_p=bf16 if rounded else None)
                err = ((x.double() - exact).norm() / exact.norm()).item()
                cells += [f"{n.float().mean():.2f} / {n.max()}", f"{err:.1e}"]
            print(f"| {mu} | {lamb_scale} | {cond.median():.0f} / {cond.max():.0f} | {tol or 'none'}, {cap} | "
                  + " | ".join(cells) + " |")


if __name__ == '__main__':
    main()
