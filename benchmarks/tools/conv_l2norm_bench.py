# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
q's (or k's) conv, SiLU and L2 norm in training, alone on a GPU: fla's `ShortConvolution` then fla's `l2norm` against
fla-mesa's `short_conv_l2norm`, forward and forward+backward (do_bench, ms), at the model's shape by default (x a
column view of the layer's fused projection output), then fla-mesa's node at other programs' sizes (tokens a program,
warps), each checked against fla's modules (outputs to the bit, gradients' relative difference).

    python benchmarks/tools/conv_l2norm_bench.py [--B 8 --T 2048 --heads 8 --head-dim 128 --width 2064]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fla.modules import ShortConvolution  # noqa: E402
from fla.modules.l2norm import l2norm  # noqa: E402

import fla_mesa.ops.mesa.conv_l2norm as node  # noqa: E402
from fla_mesa.ops.mesa.utils import L2NORM_EPS  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--B', type=int, default=8)
    p.add_argument('--T', type=int, default=2048)
    p.add_argument('--heads', type=int, default=8)
    p.add_argument('--head-dim', type=int, default=128)
    p.add_argument('--width', type=int, default=2064, help="the projection output's width (x: its first columns)")
    p.add_argument('--configs', nargs='*', default=['16x4', '32x4', '32x8', '64x8'], help='tokens x warps')
    args = p.parse_args()
    torch.manual_seed(0)
    D, HD = args.heads * args.head_dim, args.head_dim
    conv = ShortConvolution(D, 4, bias=False, activation='silu', backend='triton').cuda().bfloat16()
    base = torch.randn(args.B, args.T, args.width, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(args.B, args.T, args.heads, HD, device='cuda', dtype=torch.bfloat16)

    def fla_path(x):
        return l2norm(conv(x)[0].unflatten(-1, (-1, HD)), eps=L2NORM_EPS)

    def ours(x):
        return node.short_conv_l2norm(conv, x, HD)

    def run(fn, backward):
        if not backward:
            with torch.no_grad():
                return fn(base[..., :D])
        y = fn(base[..., :D])
        return [y, *torch.autograd.grad(y, [base, conv.weight], dy)]

    print(f"# conv, SiLU and L2 norm: B = {args.B}, T = {args.T}, {args.heads} heads of {HD}, x the first {D} of "
          f"{args.width} columns, bf16; {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}\n")
    print('| path | forward ms | forward+backward ms | y equal to fla\'s | dx, dW from fla\'s |')
    print('|---|---|---|---|---|')
    ref = run(fla_path, True)
    fwd, step = (triton.testing.do_bench(lambda: run(fla_path, b)) for b in (False, True))
    print(f"| fla's conv then norm | {fwd:.4f} | {step:.4f} | - | - |")
    for config in args.configs:
        node.BT, node.NUM_WARPS = (int(v) for v in config.split('x'))
        got = run(ours, True)
        fwd, step = (triton.testing.do_bench(lambda: run(ours, b)) for b in (False, True))
        print(f"| fla-mesa, {node.BT} tokens, {node.NUM_WARPS} warps | {fwd:.4f} | {step:.4f} | "
              f"{torch.equal(got[0], ref[0])} | {rel(got[1], ref[1]):.2e}, {rel(got[2], ref[2]):.2e} |")


if __name__ == '__main__':
    main()
