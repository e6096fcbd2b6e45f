# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
q's and k's path in the Mesa layer's training step: `l2norm(silu(conv(x)))`, fla's short convolution then fla's L2
norm, as one autograd node instead of two (and, for q, instead of a checkpoint around them). The same fla kernels
in the same order, so the same results to the bit; what it saves is host time, which bounds an eager training step.
"""

from __future__ import annotations

import torch
from fla.modules import ShortConvolution
from fla.modules.causal_conv1d import causal_conv1d_bwd, causal_conv1d_fwd
from fla.modules.l2norm import l2norm_bwd, l2norm_fwd
from fla.utils import input_guard

from fla_mesa.ops.mesa.utils import L2NORM_EPS


def _forward(x, weight, bias, cu_seqlens, head_dim):
    y, _ = causal_conv1d_fwd(x=x, weight=weight, bias=bias, residual=None, activation='silu', cu_seqlens=cu_seqlens)
    return l2norm_fwd(y.unflatten(-1, (-1, head_dim)), eps=L2NORM_EPS)


class ShortConvL2NormFunction(torch.autograd.Function):

    @staticmethod
    # x may be a column view of a wider projection's output: fla's conv reads it in place
    @input_guard(no_guard_contiguous=['x'])
    def forward(ctx, x, weight, bias, cu_seqlens, head_dim, recompute):
        y, rstd = _forward(x, weight, bias, cu_seqlens, head_dim)
        ctx.cu_seqlens, ctx.head_dim, ctx.recompute = cu_seqlens, head_dim, recompute
        # recompute: keep only the conv's input (which the conv keeps anyway), not the normalised output; else the
        # output, which the caller keeps too (the op keeps its normalised k)
        ctx.save_for_backward(x, weight, bias, *(() if recompute else (y, rstd)))
        return y

    @staticmethod
    @input_guard
    def backward(ctx, dy):
        x, weight, bias, *kept = ctx.saved_tensors
        y, rstd = _forward(x, weight, bias, ctx.cu_seqlens, ctx.head_dim) if ctx.recompute else kept
        dc = l2norm_bwd(y=y, rstd=rstd, dy=dy, eps=L2NORM_EPS).flatten(-2)
        dx, dw, db, _, _ = causal_conv1d_bwd(x=x, dy=dc, dht=None, weight=weight, bias=bias, activation='silu',
                                             cu_seqlens=ctx.cu_seqlens)
        return dx, dw, db, None, None, None


@torch.compiler.disable
def short_conv_l2norm(
    conv: ShortConvolution,
    x: torch.Tensor,
    head_dim: int,
    cu_seqlens: torch.LongTensor | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """
    `l2norm(conv(x))` per head of `head_dim`, `[B, T, H, head_dim]`, for a `conv` with SiLU on fla's Triton backend,
    no cache and no final state (training). `recompute`: the backward recomputes the conv and the norm from `x`.
    """
    return ShortConvL2NormFunction.apply(x, conv.weight.squeeze(1), conv.bias, cu_seqlens, head_dim, recompute)
