# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""Chunk-start states `H_c` (h_kk) and `S_c` (h_kv) of the Mesa chunk path, accumulated in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.ops.utils import prepare_chunk_offsets
from fla.ops.utils.op import exp2

from fla_mesa.utils import is_interpreting

# operand precisions of `mesa_dot` (the README's precision study compares them):
#   'ieee'   fp32 FMA products, no tensor cores
#   'tf32x3' a = a_hi + a_lo with a_hi exact in tf32, a_hi b_hi + a_hi b_lo + a_lo b_hi on tf32 tensor cores,
#            about fp32 accuracy; two products when `b` is bf16 (exact in tf32: b_lo = 0)
#   'tf32'   one tf32 product (10-bit mantissa operands)
#   'bf16'   one bf16 product (8-bit mantissa operands)
#   'bf16x3' our own split: a = a_hi + a_lo in bf16, a_hi b_hi + a_hi b_lo + a_lo b_hi (16-bit operands);
#            two products when `b` is already bf16 (k, v in bf16: b_lo = 0)
DOT_PRECISIONS = ('ieee', 'tf32x3', 'tf32', 'bf16', 'bf16x3')
# every kernel's default is 'auto' (`resolve_precision`): tf32x3 (fp32 level) for fp32 inputs, bf16x3 for 16-bit
# inputs, whose own rounding (~1e-3) stays 100x above what bf16x3 adds (README: "Solver precision")
STATE_DOT_PRECISION = 'auto'


def resolve_precision(precision: str | None, default: str, ref: torch.Tensor, name: str = 'precision') -> str:
    """`precision`, else `default`; 'auto' by the dtype of `ref` (an input of the op)."""
    precision = default if precision is None else precision
    if precision == 'auto':
        precision = 'tf32x3' if ref.dtype == torch.float32 else 'bf16x3'
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"`{name}` must be one of {DOT_PRECISIONS} or 'auto', got {precision!r}")
    return precision

# the interpreter multiplies bf16 tensors as raw uint16: round to bf16, then multiply in fp32 (the same
# numbers a bf16 tensor-core product with fp32 accumulation gives)
BF16_DOT_TYPE = tl.constexpr(tl.float32 if is_interpreting() else tl.bfloat16)
INTERPRETING = tl.constexpr(is_interpreting())


@triton.jit
def round_tf32(a):
    # to the nearest value with a 10-bit mantissa (ties away from zero), by integer arithmetic on the fp32 bits
    return ((a.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(a):
    # fp32 -> the nearest bf16 value (ties to even), still fp32: a store to bf16 then needs no rounding (the
    # interpreter's cast truncates)
    bits = a.to(tl.int32, bitcast=True)
    return ((bits + 32767 + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def mesa_split(a, PREC: tl.constexpr):
    """`a` as the operand pair `(hi, lo)` of `mesa_dot_split`: split once, outside loops, what a loop reuses."""
    if PREC == 'bf16x3':
        hi = a.to(tl.bfloat16)
        lo = (a.to(tl.float32) - hi.to(tl.float32)).to(tl.bfloat16).to(BF16_DOT_TYPE)
        hi = hi.to(BF16_DOT_TYPE)
    elif PREC == 'tf32x3':
        # both parts rounded to nearest tf32 (the tensor cores would truncate them: a bias that measured 5x the error)
        hi = round_tf32(a.to(tl.float32))
        lo = round_tf32(a.to(tl.float32) - hi)
    elif PREC == 'bf16':
        hi = a.to(tl.bfloat16).to(BF16_DOT_TYPE)
        lo = hi
    else:
        hi = a.to(tl.float32)
        lo = hi
    return hi, lo


@triton.jit
def _dot_part(a, b, acc, PREC: tl.constexpr):
    if PREC == 'tf32x3':
        acc = tl.dot(a, b, acc, input_precision='tf32')
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def mesa_dot_split(a_hi, a_lo, b_hi, b_lo, acc, PREC: tl.constexpr, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr):
    """`acc + a @ b` from split operands; `A_EXACT`/`B_EXACT`: that operand's lo part is zero (bf16 values)."""
    if PREC == 'bf16x3' or PREC == 'tf32x3':
        # the small terms summed from zero, apart from acc: added into a large accumulator inside the tensor
        # cores they lost bits (measured: 3-4x the error of Triton's own tf32x3 on an H100)
        small = tl.zeros(acc.shape, dtype=tl.float32)
        if not B_EXACT:
            small = _dot_part(a_hi, b_lo, small, PREC)
        if not A_EXACT:
            small = _dot_part(a_lo, b_hi, small, PREC)
        acc = _dot_part(a_hi, b_hi, acc + small, PREC)
    elif PREC == 'bf16':
        acc = tl.dot(a_hi, b_hi, acc)
    else:
        acc = tl.dot(a_hi, b_hi, acc, input_precision=PREC)
    return acc


@triton.jit
def mesa_dot(a, b, acc, PREC: tl.constexpr, B_IS_BF16: tl.constexpr, A_IS_BF16: tl.constexpr = False):
    """
    `acc + a @ b` with fp32 accumulation and operands rounded as `PREC` says; `A_IS_BF16`/`B_IS_BF16`: that operand
    holds bf16 values (exact in both splits: one product fewer).
    """
    a_hi, a_lo = mesa_split(a, PREC)
    b_hi, b_lo = mesa_split(b, PREC)
    return mesa_dot_split(a_hi, a_lo, b_hi, b_lo, acc, PREC, A_IS_BF16, B_IS_BF16)


@triton.jit
def dx_products(do, v, h_kv, bos, i_h, o_r, m_r, o_c, m_c, o_k, m_k, H: tl.constexpr, V: tl.constexpr,
                BV: tl.constexpr, PREC: tl.constexpr, V_IS_BF16: tl.constexpr, DO_IS_BF16: tl.constexpr):
    """
    The two products over V of `dx_t = e^{Γ_t} S_c do_t + Σ_j M_tj k_j (v_j·do_t)` for the rows `o_r` and the chunk's
    columns `o_c`: `(DO Vᵀ, DO S_cᵀ)`, with `h_kv` at the chunk's S_c; the caller applies the decays and k.
    """
    b_dov = tl.zeros([o_r.shape[0], o_c.shape[0]], dtype=tl.float32)
    b_dx = tl.zeros([o_r.shape[0], o_k.shape[0]], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = tl.cast(i_v, tl.int64) * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_do = tl.load(do + (bos * H + i_h) * V + o_r[:, None] * (H * V) + o_v[None, :], mask=m_r[:, None] & m_v[None, :],
                       other=0.)
        b_v = tl.load(v + (bos * H + i_h) * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                      other=0.)
        # [BV, BK] S_cᵀ
        b_st = tl.load(h_kv + o_k[None, :] * V + o_v[:, None], mask=m_v[:, None] & m_k[None, :], other=0.)
        b_dov = mesa_dot(b_do, tl.trans(b_v), b_dov, PREC, V_IS_BF16, DO_IS_BF16)
        b_dx = mesa_dot(b_do, b_st, b_dx, PREC, False, DO_IS_BF16)
    return b_dov, b_dx


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def sum2(a, b, AXIS: tl.constexpr):
    """`(tl.sum(a, AXIS), tl.sum(b, AXIS))` in one reduction: one cross-warp exchange for both on the GPU. The
    interpreter runs a two-value reduction's combine in Python (5x slower tests), so it sums them apart there."""
    if INTERPRETING:
        return tl.sum(a, AXIS), tl.sum(b, AXIS)
    return tl.reduce((a, b), AXIS, _add2)


@triton.jit
def chunk_program(i_t, i_b, chunk_indices, cu_seqlens, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """
    `(i_tg, i_t, bos, T)` of a program over one chunk: the chunk's index among all chunks (of `h_kk`), its index in
    its sequence, the sequence's first token and length. `i_t` comes in as the program's chunk axis (over every
    sequence's chunks when varlen, as fla's `chunk_indices` number them), `i_b` as its batch index.
    """
    if IS_VARLEN:
        i_tg = i_t
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        i_tg = i_b * tl.cdiv(T, BT) + i_t
        bos = i_b * T
    return i_tg, i_t, bos, T


@triton.jit
def state_program(i_n, chunk_offsets, cu_seqlens, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """`(bos, T, NT, boh)` of a program over sequence `i_n`: first token, length, chunks, first chunk (of `h_kk`)."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n * T
        boh = i_n * tl.cdiv(T, BT)
    return bos, T, tl.cdiv(T, BT), boh


@triton.jit
def _chunk_mesa_fwd_h_block(
    k,
    w,
    g,
    beta,
    h,
    h0,
    ht,
    i_k,
    i_w,
    i_n,
    i_h,
    bos,
    T,
    NT,
    boh,
    H: tl.constexpr,
    K: tl.constexpr,
    W: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BW: tl.constexpr,
    PREC: tl.constexpr,
    W_IS_BF16: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
):
    # one [BK, BW] block of the state Σ_j decay_j β_j k_j w_jᵀ (w = k for h_kk, w = v for h_kv)
    o_k = i_k * BK + tl.arange(0, BK)
    o_w = i_w * BW + tl.arange(0, BW)
    m_k = o_k < K
    m_w = o_w < W
    m_kw = m_k[:, None] & m_w[None, :]
    i_nh = i_n * H + i_h

    b_h = tl.zeros([BK, BW], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_nh * K * W + o_k[:, None] * W + o_w[None, :]
        b_h += tl.load(p_h0, mask=m_kw, other=0.).to(tl.float32)

    for i_s in range(0, NT):
        # interpreter loop variables are Python ints: tl.cast, not .to
        i_t = tl.cast(i_s, tl.int64)
        # the state before chunk i_t
        p_h = h + ((boh + i_t) * H + i_h) * K * W + o_k[:, None] * W + o_w[None, :]
        tl.store(p_h, b_h.to(p_h.dtype.element_ty), mask=m_kw)

        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        # [BK, BT]
        p_k = k + (bos * H + i_h) * K + o_t[None, :] * (H * K) + o_k[:, None]
        b_k = tl.load(p_k, mask=m_k[:, None] & m_t[None, :], other=0.).to(tl.float32)
        # [BT, BW]
        p_w = w + (bos * H + i_h) * W + o_t[:, None] * (H * W) + o_w[None, :]
        b_w = tl.load(p_w, mask=m_t[:, None] & m_w[None, :], other=0.)
        b_g = tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0.).to(tl.float32)
        b_beta = tl.load(beta + (bos + o_t) * H + i_h, mask=m_t, other=0.).to(tl.float32)
        i_last = tl.minimum((i_t + 1) * BT, T) - 1
        b_g_last = tl.load(g + (bos + i_last) * H + i_h).to(tl.float32)

        b_h *= exp2(b_g_last)
        # padded tokens have beta = 0 and k = 0: no contribution
        b_kd = b_k * (exp2(b_g_last - b_g) * b_beta)[None, :]
        b_h = mesa_dot(b_kd, b_w, b_h, PREC, W_IS_BF16)

    if STORE_FINAL_STATE:
        p_ht = ht + i_nh * K * W + o_k[:, None] * W + o_w[None, :]
        tl.store(p_ht, b_h.to(p_ht.dtype.element_ty), mask=m_kw)


def state_configs():
    # the forward state kernel's and the backward's reverse one (the same shape of work)
    if is_interpreting():
        return [triton.Config({'BK': 32, 'BW': 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({'BK': 64, 'BW': BW}, num_warps=4, num_stages=num_stages)
        for BW in [32, 64]
        for num_stages in [2, 3]
    ]


@triton.heuristics({
    'USE_INITIAL_STATE': lambda args: args['h0_kk'] is not None,
    'STORE_FINAL_STATE': lambda args: args['ht_kk'] is not None,
    'IS_VARLEN': lambda args: args['cu_seqlens'] is not None,
})
@triton.autotune(configs=state_configs(), key=['K', 'V', 'BT', 'PREC', 'K_IS_BF16', 'V_IS_BF16'])
@triton.jit(do_not_specialize=['T'])
def chunk_mesa_fwd_kernel_h(
    k,
    v,
    g,
    beta,
    h_kk,
    h_kv,
    h0_kk,
    h0_kv,
    ht_kk,
    ht_kv,
    cu_seqlens,
    chunk_offsets,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BW: tl.constexpr,
    PREC: tl.constexpr,
    K_IS_BF16: tl.constexpr,
    V_IS_BF16: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # program axis 0 walks the column blocks of [h_kk | h_kv] (BW wide) times the row blocks (BK high)
    i_kw, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    NK = tl.cdiv(K, BK)
    NWK = tl.cdiv(K, BW)
    i_k, i_w = i_kw % NK, i_kw // NK
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = state_program(i_n, chunk_offsets, cu_seqlens, T, BT, IS_VARLEN)

    if i_w < NWK:
        _chunk_mesa_fwd_h_block(
            k, k, g, beta, h_kk, h0_kk, ht_kk, i_k, i_w, i_n, i_h, bos, T, NT, boh,
            H, K, K, BT, BK, BW, PREC, K_IS_BF16, USE_INITIAL_STATE, STORE_FINAL_STATE,
        )
    else:
        _chunk_mesa_fwd_h_block(
            k, v, g, beta, h_kv, h0_kv, ht_kv, i_k, i_w - NWK, i_n, i_h, bos, T, NT, boh,
            H, K, V, BT, BK, BW, PREC, V_IS_BF16, USE_INITIAL_STATE, STORE_FINAL_STATE,
        )


def chunk_mesa_fwd_h(
    k: torch.Tensor,
    v: torch.Tensor,
    g_cum: torch.Tensor,
    beta: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    r"""
    The states at the start of every chunk, in float32.

    Args:
        k (torch.Tensor): keys `[B, T, H, K]`.
        v (torch.Tensor): values `[B, T, H, V]`.
        g_cum (torch.Tensor): in-chunk cumulative log-decay in log2 space `[B, T, H]`, float32
            (`chunk_local_cumsum(g, chunk_size, scale=RCP_LN2, ...)`).
        beta (torch.Tensor): write strengths `[B, T, H]`.
        initial_state (Tuple[torch.Tensor, torch.Tensor], Optional): `(h_kk [N, H, K, K], h_kv [N, H, K, V])`.
        output_final_state (bool): also return the states after the last token.
        cu_seqlens (torch.LongTensor, Optional): `[N + 1]` packed sequence boundaries (B == 1).
        chunk_indices (torch.LongTensor, Optional): `prepare_chunk_indices(cu_seqlens, chunk_size)`; only its
            length is used (the number of chunks).
        chunk_size (int): the chunk length `BT`.
        precision (str, Optional): operand precision of the products, one of `DOT_PRECISIONS` or 'auto'.
            Default: `STATE_DOT_PRECISION` ('auto': tf32x3 for fp32 `k`, bf16x3 otherwise).

    Returns:
        h_kk (torch.Tensor): `[B, NT, H, K, K]` float32, `h_kk[:, i]` the state before chunk i (varlen: B = 1, NT
            the chunks of all sequences).
        h_kv (torch.Tensor): `[B, NT, H, K, V]` float32.
        final_state (Tuple[torch.Tensor, torch.Tensor]): `([N, H, K, K], [N, H, K, V])` float32, or `None`.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = chunk_size
    precision = resolve_precision(precision, STATE_DOT_PRECISION, k)
    if cu_seqlens is None:
        N, NT, chunk_offsets = B, triton.cdiv(T, BT), None
    else:
        chunk_offsets = prepare_chunk_offsets(cu_seqlens, BT)
        N = len(cu_seqlens) - 1
        NT = len(chunk_indices) if chunk_indices is not None else int(chunk_offsets[-1].item())
    k, v, g_cum, beta = (x.contiguous() for x in (k, v, g_cum, beta))
    h0_kk = h0_kv = None
    if initial_state is not None:
        h0_kk, h0_kv = (x.contiguous() for x in initial_state)

    h_kk = k.new_empty(B, NT, H, K, K, dtype=torch.float32)
    h_kv = k.new_empty(B, NT, H, K, V, dtype=torch.float32)
    ht_kk = k.new_empty(N, H, K, K, dtype=torch.float32) if output_final_state else None
    ht_kv = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None

    def grid(meta):
        nk = triton.cdiv(K, meta['BK'])
        return (nk * (triton.cdiv(K, meta['BW']) + triton.cdiv(V, meta['BW'])), N * H)

    chunk_mesa_fwd_kernel_h[grid](
        k=k,
        v=v,
        g=g_cum,
        beta=beta,
        h_kk=h_kk,
        h_kv=h_kv,
        h0_kk=h0_kk,
        h0_kv=h0_kv,
        ht_kk=ht_kk,
        ht_kv=ht_kv,
        cu_seqlens=cu_seqlens,
        chunk_offsets=chunk_offsets,
        T=T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        PREC=precision,
        K_IS_BF16=k.dtype == torch.bfloat16,
        V_IS_BF16=v.dtype == torch.bfloat16,
    )
    return h_kk, h_kv, ((ht_kk, ht_kv) if output_final_state else None)
