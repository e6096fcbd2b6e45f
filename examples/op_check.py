# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""A short run of `chunk_mesa`: its error against the float64 exact solve, and the CG steps it took."""

import argparse

import torch
import torch.nn.functional as F

from fla_mesa.ops.mesa import chunk_mesa, naive_exact_mesa


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--batch', type=int, default=2, help='sequences')
    parser.add_argument('--seq-len', type=int, default=256, help='tokens per sequence')
    parser.add_argument('--heads', type=int, default=4, help='heads')
    parser.add_argument('--head-dim', type=int, default=64, help='key and value dimension per head')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='where to run')
    args = parser.parse_args()

    torch.manual_seed(0)
    B, T, H, K = args.batch, args.seq_len, args.heads, args.head_dim
    q, k, v = (torch.randn(B, T, H, K, dtype=torch.float64) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float64) + 4)
    beta = torch.rand(B, T, H, dtype=torch.float64)
    lamb = 0.25 + F.softplus(torch.randn(H, K, dtype=torch.float64))
    ref, _ = naive_exact_mesa(q, k, v, g, beta, lamb, use_qk_l2norm_in_kernel=True)
    ref_norm = ref.norm()

    print(f"B={B} T={T} H={H} K=V={K}, float32 on {args.device}, error relative to a float64 exact solve")
    print(f"{'cg_tol':>8} {'precond':>8} {'rel. error':>11} {'mean steps':>11} {'max steps':>10}")
    inputs = [x.float().to(args.device) for x in (q, k, v, g, beta, lamb)]
    for tol in (None, 1e-4, 1e-2):
        for precondition in (False, True):
            o, _, steps = chunk_mesa(*inputs, cg_max_steps=30, cg_tol=tol, precondition=precondition,
                                     use_qk_l2norm_in_kernel=True, return_cg_steps=True)
            err = ((o.double().cpu() - ref).norm() / ref_norm).item()
            print(f"{str(tol):>8} {str(precondition):>8} {err:11.2e} {steps.float().mean().item():11.2f} {steps.max().item():10d}")


if __name__ == '__main__':
    main()
