# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Rounded CG directions, in PyTorch on the CPU: does rounding each direction p to bf16 (so that A p needs one product
fewer per matmul with split operands) cost steps or accuracy?

Dense per-token systems (H_t + Λ) x_t = q_t built in float64 from the benchmark's inputs (unit-norm bf16 q and k,
g = logsigmoid(N(0,1) + mu), beta = sigmoid(U), lamb = softplus(U) + 0.25, here scaled down to make them
ill-conditioned), solved by the kernel's Jacobi PCG in float32: 'plain' as the kernel without the option (fp32
products), 'rounded' with p rounded to bf16 before A p and x, r moved along the rounded p with the exact line
search α = rᵀp / pᵀAp. Mean and max steps per token, and the relative error of x against the float64 solve.

    python benchmarks/rounded_directions_study.py
"""

import torch
import torch.nn.functional as F


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


def pcg(A, b, max_steps, tol, rounded):
    """The kernel's Jacobi PCG (x0 = b / diag(A), per-row freezing, the float32 residual floor), in float32."""
    A, b = A.float(), b.float()
    scale = b.norm(dim=-1, keepdim=True)
    b = b / scale
    dinv = 1 / torch.diagonal(A, dim1=-2, dim2=-1)
    x = b * dinv
    r = b - (A @ x[..., None])[..., 0]
    z = r * dinv
    p, rz = z, (r * z).sum(-1)
    floor2 = max(tol ** 2, 3e-10 ** 2)
    act = (r * r).sum(-1) > floor2
    steps = torch.zeros(b.shape[0], dtype=torch.int32)
    for _ in range(max_steps):
        if not act.any():
            break
        if rounded:
            p = p.bfloat16().float()
        w = (A @ p[..., None])[..., 0]
        pw = (p * w).sum(-1)
        act = act & (pw > 0)
        num = (r * p).sum(-1) if rounded else rz
        alpha = torch.where(act, num / torch.where(act, pw, 1), 0)
        x, r = x + alpha[:, None] * p, r - alpha[:, None] * w
        z = r * dinv
        rz_new = (r * z).sum(-1)
        p = z + torch.where(act, rz_new / torch.where(act, rz, 1), 0)[:, None] * p
        rz = torch.where(act, rz_new, rz)
        steps += act.int()
        act = act & ((r * r).sum(-1) > floor2) & (rz > 0)
    return x * scale, steps


def main():
    print("| gates mu | Λ scale | cond median / max | cg_tol, cap | plain steps mean / max | plain err "
          "| rounded steps mean / max | rounded err |")
    print("|---|---|---|---|---|---|---|---|")
    for mu, lamb_scale in ((4.0, 1.0), (8.0, 1.0), (8.0, 0.1), (8.0, 0.01), (8.0, 0.001)):
        A, b = systems(256, 2, 64, mu, lamb_scale)
        cond = torch.linalg.cond(A)
        exact = torch.linalg.solve(A, b[..., None])[..., 0]
        for tol, cap in ((1e-4, 30), (0.0, 30), (0.0, 200)):
            cells = []
            for rounded in (False, True):
                x, n = pcg(A, b, cap, tol, rounded)
                err = ((x.double() - exact).norm() / exact.norm()).item()
                cells += [f"{n.float().mean():.2f} / {n.max()}", f"{err:.1e}"]
            print(f"| {mu} | {lamb_scale} | {cond.median():.0f} / {cond.max():.0f} | {tol or 'none'}, {cap} | "
                  + " | ".join(cells) + " |")


if __name__ == '__main__':
    main()
