# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
q's and k's path in the Mesa layer's training step: `l2norm(silu(conv(x)))` per head, fla's short convolution (SiLU,
no state) then fla's L2 norm, as one autograd node of two kernels of its own. Forward: the conv, SiLU and norm in one
pass (the conv's output rounded to x's dtype before the norm, as fla's conv stores it). Backward: one pass recomputes
the conv from x and takes the gradient through the norm and SiLU to the conv's output, then fla's conv backward
without an activation (it would recompute the conv once more) gives x's, the weight's and the bias's. Nothing but x
is kept (the conv keeps it anyway): q's norm output is not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.modules import ShortConvolution
from fla.modules.causal_conv1d import causal_conv1d_bwd
from fla.ops.utils import prepare_chunk_indices
from fla.utils import input_guard

from fla_mesa.ops.mesa.utils import L2NORM_EPS

# tokens a program (one head each): the pass is bound by its loads, and five [BT, head] float32 tiles must fit in
# registers in the backward
BT = 32
NUM_WARPS = 4


@triton.jit
def _conv_silu_norm(x, weight, bias, cu_seqlens, chunk_indices, T, stride_x_n, stride_x_t, HD: tl.constexpr,
                    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr, ROUND: tl.constexpr,
                    HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr):
    # one head's [BT, HD] tile: the conv's output z (bias and all, as fla's conv: the oldest token's term first),
    # σ(z), s = silu(z) rounded as fla's conv stores it (ROUND: x's dtype), and the norm's 1 / ‖s‖
    i_h, i_t, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if IS_VARLEN:
        i_n, i_t = tl.load(chunk_indices + i_t * 2).to(tl.int32), tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        p_x = x + bos * stride_x_t
    else:
        bos = i_b.to(tl.int64) * T
        p_x = x + i_b.to(tl.int64) * stride_x_n
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    o_c = tl.arange(0, BD)
    m_c = o_c < HD
    o_d = i_h * HD + o_c

    b_z = tl.zeros([BT, BD], dtype=tl.float32)
    for i_w in tl.static_range(W):
        o_x = o_t + i_w - (W - 1)
        m_x = ((o_x >= 0) & (o_x < T))[:, None] & m_c[None, :]
        b_x = tl.load(p_x + o_x[:, None] * stride_x_t + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
        b_z += b_x * tl.load(weight + o_d * W + i_w, mask=m_c, other=0.).to(tl.float32)[None, :]
    if HAS_BIAS:
        b_z += tl.load(bias + o_d, mask=m_c, other=0.).to(tl.float32)[None, :]
    b_sig = tl.sigmoid(b_z)
    b_s = b_z * b_sig
    if ROUND:
        b_s = b_s.to(x.dtype.element_ty).to(tl.float32)
    b_s = tl.where(m_c[None, :], b_s, 0.)
    b_r = 1 / tl.sqrt(tl.sum(b_s * b_s, 1) + EPS)
    # the output's rows: [B, T, H * HD] contiguous
    p_o = (bos + o_t)[:, None] * (tl.num_programs(0) * HD) + o_d[None, :]
    m_o = (o_t < T)[:, None] & m_c[None, :]
    return b_z, b_sig, b_s, b_r, p_o, m_o


@triton.heuristics({
    'HAS_BIAS': lambda args: args['bias'] is not None,
    'IS_VARLEN': lambda args: args['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def conv_l2norm_fwd_kernel(x, weight, bias, y, cu_seqlens, chunk_indices, T, stride_x_n, stride_x_t,
                           HD: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr,
                           ROUND: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr):
    _, _, b_s, b_r, p_o, m_o = _conv_silu_norm(x, weight, bias, cu_seqlens, chunk_indices, T, stride_x_n, stride_x_t,
                                               HD, W, BT, BD, EPS, ROUND, HAS_BIAS, IS_VARLEN)
    tl.store(y + p_o, (b_s * b_r[:, None]).to(y.dtype.element_ty), mask=m_o)


@triton.heuristics({
    'HAS_BIAS': lambda args: args['bias'] is not None,
    'IS_VARLEN': lambda args: args['cu_seqlens'] is not None,
})
@triton.jit(do_not_specialize=['T'])
def conv_l2norm_bwd_kernel(x, weight, bias, dy, dz, cu_seqlens, chunk_indices, T, stride_x_n, stride_x_t,
                           HD: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, EPS: tl.constexpr,
                           ROUND: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr):
    # dz = ∂L/∂z: through the norm (y = s / ‖s‖, y unrounded) and SiLU (the rounding of s passed straight through)
    b_z, b_sig, b_s, b_r, p_o, m_o = _conv_silu_norm(x, weight, bias, cu_seqlens, chunk_indices, T, stride_x_n,
                                                     stride_x_t, HD, W, BT, BD, EPS, ROUND, HAS_BIAS, IS_VARLEN)
    b_y = b_s * b_r[:, None]
    b_dy = tl.load(dy + p_o, mask=m_o, other=0.).to(tl.float32)
    b_ds = (b_dy - tl.sum(b_dy * b_y, 1)[:, None] * b_y) * b_r[:, None]
    b_dz = b_ds * b_sig * (1 + b_z * (1 - b_sig))
    tl.store(dz + p_o, b_dz.to(dz.dtype.element_ty), mask=m_o)


def _launch(kernel, x, weight, bias, cu_seqlens, head_dim, **tensors):
    B, T, D = x.shape
    chunk_indices = prepare_chunk_indices(cu_seqlens, BT) if cu_seqlens is not None else None
    NT = len(chunk_indices) if cu_seqlens is not None else triton.cdiv(T, BT)
    kernel[(D // head_dim, NT, B)](
        x=x, weight=weight, bias=bias, **tensors, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T,
        stride_x_n=x.stride(0), stride_x_t=x.stride(1), HD=head_dim, W=weight.shape[1], BT=BT,
        BD=triton.next_power_of_2(head_dim), EPS=L2NORM_EPS, ROUND=x.dtype != torch.float32, num_warps=NUM_WARPS,
    )


class ShortConvL2NormFunction(torch.autograd.Function):

    @staticmethod
    # x may be a column view of a wider projection's output (unit stride along its last dimension): read in place
    @input_guard(no_guard_contiguous=['x'])
    def forward(ctx, x, weight, bias, cu_seqlens, head_dim):
        if x.stride(-1) != 1:
            x = x.contiguous()
        y = x.new_empty(*x.shape[:2], x.shape[-1] // head_dim, head_dim)
        _launch(conv_l2norm_fwd_kernel, x, weight, bias, cu_seqlens, head_dim, y=y)
        ctx.cu_seqlens, ctx.head_dim = cu_seqlens, head_dim
        ctx.save_for_backward(x, weight, bias)
        return y

    @staticmethod
    @input_guard
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        # dz in x's dtype, as fla's conv rounds the gradient it takes (there, the norm's input's)
        dz = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _launch(conv_l2norm_bwd_kernel, x, weight, bias, ctx.cu_seqlens, ctx.head_dim, dy=dy, dz=dz)
        dx, dw, db, _, _ = causal_conv1d_bwd(x=x, dy=dz, dht=None, weight=weight, bias=bias, activation=None,
                                             cu_seqlens=ctx.cu_seqlens)
        return dx, dw, db, None, None


@torch.compiler.disable
def short_conv_l2norm(
    conv: ShortConvolution,
    x: torch.Tensor,
    head_dim: int,
    cu_seqlens: torch.LongTensor | None = None,
) -> torch.Tensor:
    """
    `l2norm(conv(x))` per head of `head_dim`, `[B, T, H, head_dim]`, for a `conv` with SiLU (fla's
    `ShortConvolution`), no cache and no final state (training); the backward recomputes the conv from `x`.
    """
    if x.shape[-1] % head_dim != 0:
        raise ValueError(f"`x`'s last dimension ({x.shape[-1]}) must be a multiple of `head_dim` ({head_dim})")
    return ShortConvL2NormFunction.apply(x, conv.weight.squeeze(1), conv.bias, cu_seqlens, head_dim)
