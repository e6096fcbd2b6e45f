# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Several bias-free projections of one input as one GEMM (a layer's q, k, v and gate projections): their outputs are
column views of one tensor. The backward is then two GEMMs, where separate projections take two each and sum their
input gradients, and a narrow projection (a per-head gate's) gets its weight gradient from the wide GEMM instead of a
slow one of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.utils import autocast_custom_bwd, autocast_custom_fwd


class FusedLinearsFunction(torch.autograd.Function):

    @staticmethod
    @autocast_custom_fwd
    def forward(ctx, x, *weights):
        # the weights themselves are kept, not their concatenation: a parameter costs no activation memory, a copy would
        ctx.save_for_backward(x, *weights)
        return F.linear(x, torch.cat(weights))

    @staticmethod
    @autocast_custom_bwd
    def backward(ctx, dy):
        x, *weights = ctx.saved_tensors
        # in the output's dtype, as the forward computed it (under an autocast that the backward may not see, as on a
        # CPU); autograd casts each gradient to its input's dtype
        dx = dy @ torch.cat(weights).to(dy.dtype) if ctx.needs_input_grad[0] else None
        dws = [None] * len(weights)
        if any(ctx.needs_input_grad[1:]):
            dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)
            dws = [d if need else None for d, need in zip(dw.split([w.shape[0] for w in weights]), ctx.needs_input_grad[1:])]
        return dx, *dws


def fused_linears(x: torch.Tensor, weights: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """
    `F.linear(x, w)` for each `w` in `weights` (`[out_i, in]`, one dtype), computed as one GEMM.

    Returns:
        a tuple of `[..., out_i]` column views of one `[..., Σ out_i]` tensor.
    """
    if not weights:
        raise ValueError("`weights` must hold at least one weight")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"`weights[{i}]` must have shape [out, {x.shape[-1]}] (x's last dimension), "
                             f"got {tuple(w.shape)}")
    return FusedLinearsFunction.apply(x, *weights).split([w.shape[0] for w in weights], -1)
