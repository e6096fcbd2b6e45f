# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""CG steps to reach cg_tol=1e-4, plain vs Jacobi-preconditioned, against a float64 exact solve (CPU, float64)."""

import torch
import torch.nn.functional as F

from fla_mesa.ops.mesa import naive_chunk_mesa, naive_exact_mesa


def main(B=1, T=512, H=4, K=64, tol=1e-4):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    print("| keys | gate (mu, sigma) | Λ | plain CG steps | rel. error | Jacobi PCG steps | rel. error |")
    print("|---|---|---|---|---|---|---|")
    for keys in ('isotropic', 'anisotropic'):
        # anisotropic: key and query coordinates with scales spread over 1.5 decades, as trained projections make
        sc = torch.ones(K, **f64) if keys == 'isotropic' else torch.logspace(-1, 0.5, K, **f64)
        for gate in ((3.0, 1.0), (6.0, 1.0), (9.0, 0.5)):
            for lam in ('1', '0.25+softplus(N(0,1))'):
                q = F.normalize(torch.randn(B, T, H, K, **f64) * sc, dim=-1)
                k = F.normalize(torch.randn(B, T, H, K, **f64) * sc, dim=-1)
                v = torch.randn(B, T, H, K, **f64)
                g = F.logsigmoid(torch.randn(B, T, H, **f64) * gate[1] + gate[0])
                beta = torch.rand(B, T, H, **f64)
                lamb = torch.ones(H, K, **f64) if lam == '1' else 0.25 + F.softplus(torch.randn(H, K, **f64))
                ref, _ = naive_exact_mesa(q, k, v, g, beta, lamb)
                row = []
                for precondition in (False, True):
                    o, _, steps = naive_chunk_mesa(q, k, v, g, beta, lamb, cg_max_steps=30, cg_tol=tol,
                                                   precondition=precondition, return_cg_steps=True)
                    row += [f"{steps.float().mean().item():.2f}", f"{((o - ref).norm() / ref.norm()).item():.1e}"]
                print(f"| {keys} | {gate} | {lam} | " + " | ".join(row) + " |")


if __name__ == '__main__':
    main()
