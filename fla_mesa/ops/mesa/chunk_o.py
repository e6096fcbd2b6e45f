# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The chunk path's output pass: GLA's readout with β inside the decay matrix, in split products. One kernel serves
the forward's readout `o_t = S_tᵀ x_t` (after the CG solve) and the backward's `dx_t = S_t do_t` (the adjoint solve's
right-hand side, or dq itself where there is no solve): both are
`out_t = e^{Γ_t} a_t G_c + Σ_{j<=t} M_tj (a_t·d_j) c_j` with `M_tj = 2^(Γ_t − Γ_j) β_j`, for (a, d, c, G_c) =
(x, k, v, S_c) and (do, v, k, S_cᵀ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.ops.utils import prepare_chunk_indices
from fla.utils import autotune_cache_kwargs

from fla_mesa.ops.mesa.kernel_utils import (
    chunk_program, exp2, mesa_dot, readout_products, resolve_precision, round_code, round_to,
)
from fla_mesa.utils import is_interpreting

# operand precision of the products; 'auto': tf32x3 (~fp32) for fp32 keys, bf16x3 for 16-bit ones
O_DOT_PRECISION = 'auto'


def _configs():
    if is_interpreting():
        # small blocks under the interpreter: the tests exercise the multi-block loops and their masks
        return [triton.Config({'BM': 32, 'BN': 32}, num_warps=4, num_stages=1)]
    # small programs, several resident an SM: the pass is bound by its loads. Not BM = 128 with BN = 32: Triton 3.6
    # faults on Hopper there (illegal memory access, benchmarks/results/solver_h200.md)
    return [
        triton.Config({'BM': BM, 'BN': BN}, num_warps=4, num_stages=num_stages)
        for BM, BN, num_stages in [(32, 32, 1), (64, 64, 1), (64, 64, 2), (128, 64, 1)]
    ]


@triton.heuristics({'IS_VARLEN': lambda args: args['cu_seqlens'] is not None})
@triton.autotune(configs=_configs(), key=['M', 'N', 'BT', 'PREC', 'TRANS_G'], **autotune_cache_kwargs)
@triton.jit(do_not_specialize=['T'])
def chunk_mesa_kernel_o(
    a,
    d,
    c,
    g,
    beta,
    h,
    out,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    M: tl.constexpr,
    N: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    A_IS_BF16: tl.constexpr,
    D_IS_BF16: tl.constexpr,
    C_IS_BF16: tl.constexpr,
    TRANS_G: tl.constexpr,
    ROUND: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # out_t = e^{Γ_t} a_t G_c + Σ_{j<=t} M_tj (a_t·d_j) c_j for BN columns of one chunk and head; a, d: [.., M],
    # c, out: [.., N]; G_c [M, N] is the chunk-start state h [K, V] itself, or with TRANS_G its transpose
    i_n, i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg, i_t, bos, T = chunk_program(i_t, i_b, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_g = tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_beta = tl.load(beta + (bos + o_t) * H + i_h, mask=m_t, other=0.).to(tl.float32)
    h += (i_tg * H + i_h) * M * N

    b_ad, b_o = readout_products(a, d, h, bos, i_h, o_t, m_t, o_t, m_t, o_n, m_n, H, M, N, BM, PREC, A_IS_BF16, D_IS_BF16,
                                 TRANS_G)
    b_o *= exp2(b_g)[:, None]
    # padded rows/columns are masked before exp2 could overflow into inf * 0
    m_tt = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_ad = tl.where(m_tt, b_ad * exp2(b_g[:, None] - b_g[None, :]) * b_beta[None, :], 0.)
    b_c = tl.load(c + (bos * H + i_h) * N + o_t[:, None] * (H * N) + o_n[None, :], mask=m_t[:, None] & m_n[None, :],
                  other=0.)
    b_o = round_to(mesa_dot(b_ad, b_c, b_o, PREC, C_IS_BF16), ROUND)
    tl.store(out + (bos * H + i_h) * N + o_t[:, None] * (H * N) + o_n[None, :], b_o, mask=m_t[:, None] & m_n[None, :])


def _chunk_mesa_o(a, d, c, g_cum, beta, h, trans_g, out_dtype, cu_seqlens, chunk_indices, chunk_size, precision, ref):
    B, T, H, M = a.shape
    N = c.shape[-1]
    BT = chunk_size
    precision = resolve_precision(precision, O_DOT_PRECISION, ref)
    if cu_seqlens is None:
        NT = triton.cdiv(T, BT)
    else:
        if chunk_indices is None:
            chunk_indices = prepare_chunk_indices(cu_seqlens, BT)
        NT = len(chunk_indices)
    a, d, c, g_cum, beta, h = (t.contiguous() for t in (a, d, c, g_cum, beta, h))
    out = a.new_empty(B, T, H, N, dtype=out_dtype)

    def grid(meta):
        return (triton.cdiv(N, meta['BN']), NT, B * H)

    chunk_mesa_kernel_o[grid](
        a=a, d=d, c=c, g=g_cum, beta=beta, h=h, out=out, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, T=T,
        H=H, M=M, N=N, BT=BT, PREC=precision, A_IS_BF16=a.dtype == torch.bfloat16, D_IS_BF16=d.dtype == torch.bfloat16,
        C_IS_BF16=c.dtype == torch.bfloat16, TRANS_G=trans_g, ROUND=round_code(out_dtype),
    )
    return out


def chunk_mesa_fwd_o(
    x: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cum: torch.Tensor,
    beta: torch.Tensor,
    h_kv: torch.Tensor,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    precision: str | None = None,
    o_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""
    The readout `o_t = S_tᵀ x_t = e^{Γ_t} S_cᵀ x_t + Σ_{j<=t} M_tj v_j (k_j·x_t)`.

    Args:
        x (torch.Tensor): the solutions `[B, T, H, K]` (float32).
        k (torch.Tensor): `[B, T, H, K]`.
        v (torch.Tensor): `[B, T, H, V]`.
        g_cum (torch.Tensor): `[B, T, H]` float32, in-chunk cumulative log-decay in log2 space.
        beta (torch.Tensor): `[B, T, H]`.
        h_kv (torch.Tensor): chunk-start states `[B, NT, H, K, V]` float32.
        cu_seqlens, chunk_indices: varlen as in fla.
        chunk_size (int): the chunk length.
        precision (str, Optional): operand precision of the products. Default: `O_DOT_PRECISION`, by k's dtype.
        o_dtype (torch.dtype, Optional): dtype of o. Default: v's.

    Returns:
        o (torch.Tensor): `[B, T, H, V]`.
    """
    return _chunk_mesa_o(x, k, v, g_cum, beta, h_kv, False, o_dtype or v.dtype, cu_seqlens, chunk_indices, chunk_size,
                         precision, k)


def chunk_mesa_bwd_dx(
    do: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cum: torch.Tensor,
    beta: torch.Tensor,
    h_kv: torch.Tensor,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    precision: str | None = None,
) -> torch.Tensor:
    r"""
    `dx_t = S_t do_t = e^{Γ_t} S_c do_t + Σ_{j<=t} M_tj k_j (v_j·do_t)`, the gradient reaching the solution x_t (and
    the right-hand side of the adjoint solve). Arguments as `chunk_mesa_fwd_o`'s, with `do` `[B, T, H, V]`.

    Returns:
        dx (torch.Tensor): `[B, T, H, K]` float32.
    """
    return _chunk_mesa_o(do, v, k, g_cum, beta, h_kv, True, torch.float32, cu_seqlens, chunk_indices, chunk_size,
                         precision, k)
