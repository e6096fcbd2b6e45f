# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The state passes of the Mesa chunk path, side by side: forward, the chunk-start states `H_c` (h_kk) and `S_c` (h_kv);
reverse (the backward), the gradients of the state after every chunk. One program per [BK, BW] block of
`[h_kk | h_kv]` and sequence-head, walking the chunks in order (forward) or back (reverse); each chunk's product is
summed from zero and added to the running state, carried in float32 with a compensation term (`_decay_add`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.ops.utils import prepare_chunk_offsets
from fla.utils import autotune_cache_kwargs

from fla_mesa.ops.mesa.kernel_utils import exp2, mesa_dot, resolve_precision
from fla_mesa.utils import is_interpreting

# every kernel's default is 'auto' (`resolve_precision`): tf32x3 (fp32 level) for fp32 inputs, bf16x3 for 16-bit
# inputs, whose own rounding stays far above what bf16x3 adds (op README: "Solver precision")
STATE_DOT_PRECISION = 'auto'
# `_decay_add`'s TwoSum needs every add rounded on its own: with fused multiply-adds the compiler may fold the decay's
# product into the add that follows it, and the stored state is then off the carried pair by up to that product's
# rounding error. Off leaves the products alone (tensor-core dots), and `tl.fma` stays an fma
STATE_FP_FUSION = False


@triton.jit
def _decay_add(b_h, b_lo, b_d, b_delta):
    """
    `b_d (b_h + b_lo) + b_delta` as a new pair `(b_h, b_lo)`: a running state carried at about twice float32's
    precision (op README, "Compensated state passes"). `b_h` is the float32 nearest the pair (what the passes store),
    `b_lo` the part it leaves out. `b_delta` is the chunk's product, summed from zero.
    """
    b_p = b_h * b_d
    # the decay's rounding error, exact: the fma rounds once
    b_lo = tl.fma(b_h, b_d, -b_p) + b_lo * b_d
    b_y = b_delta + b_lo
    # TwoSum: b_h + b_lo == b_p + b_y exactly (any order of magnitudes: the first chunk's b_p is 0)
    b_h = b_p + b_y
    b_z = b_h - b_p
    b_lo = (b_p - (b_h - b_z)) + (b_y - b_z)
    return b_h, b_lo


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
    # one [BK, BW] block of the state Σ_j decay_j β_j k_j w_jᵀ (w = k for h_kk, w = v for h_kv), from the first chunk
    # to the last; h[c] holds the state before chunk c
    o_k = i_k * BK + tl.arange(0, BK)
    o_w = i_w * BW + tl.arange(0, BW)
    m_k = o_k < K
    m_w = o_w < W
    m_kw = m_k[:, None] & m_w[None, :]
    i_nh = i_n * H + i_h

    b_h = tl.zeros([BK, BW], dtype=tl.float32)
    b_h_lo = tl.zeros([BK, BW], dtype=tl.float32)
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

        # padded tokens have beta = 0 and k = 0: no contribution
        b_kd = b_k * (exp2(b_g_last - b_g) * b_beta)[None, :]
        # the chunk's product from zero, added outside the tensor cores (they lose the product's low bits when
        # adding it into a large accumulator), with the running state's compensation term
        b_hc = mesa_dot(b_kd, b_w, tl.zeros([BK, BW], dtype=tl.float32), PREC, W_IS_BF16)
        b_h, b_h_lo = _decay_add(b_h, b_h_lo, exp2(b_g_last), b_hc)

    if STORE_FINAL_STATE:
        p_ht = ht + i_nh * K * W + o_k[:, None] * W + o_w[None, :]
        tl.store(p_ht, b_h.to(p_ht.dtype.element_ty), mask=m_kw)


@triton.jit
def _chunk_mesa_bwd_dh_block(
    a,
    b,
    g,
    dh,
    dht,
    dh0,
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
    SIGN: tl.constexpr,
    B_IS_BF16: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
):
    # one [BK, BW] block of D_c = e^{Γ_C} D_{c+1} + SIGN Σ_i e^{Γ_i} a_i b_iᵀ, from the last chunk back to the first;
    # dh[c] holds the gradient of the state after chunk c
    o_k = i_k * BK + tl.arange(0, BK)
    o_w = i_w * BW + tl.arange(0, BW)
    m_k = o_k < K
    m_w = o_w < W
    m_kw = m_k[:, None] & m_w[None, :]
    i_nh = i_n * H + i_h

    b_dh = tl.zeros([BK, BW], dtype=tl.float32)
    b_dh_lo = tl.zeros([BK, BW], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh * K * W + o_k[:, None] * W + o_w[None, :], mask=m_kw, other=0.).to(tl.float32)

    for i_s in range(0, NT):
        i_t = NT - 1 - tl.cast(i_s, tl.int64)
        tl.store(dh + ((boh + i_t) * H + i_h) * K * W + o_k[:, None] * W + o_w[None, :], b_dh, mask=m_kw)

        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        # [BK, BT]
        b_a = tl.load(a + (bos * H + i_h) * K + o_t[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                      other=0.)
        # [BT, BW]
        b_b = tl.load(b + (bos * H + i_h) * W + o_t[:, None] * (H * W) + o_w[None, :], mask=m_t[:, None] & m_w[None, :],
                      other=0.)
        b_g = tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0.).to(tl.float32)
        i_last = tl.minimum((i_t + 1) * BT, T) - 1
        b_g_last = tl.load(g + (bos + i_last) * H + i_h).to(tl.float32)

        b_a = b_a.to(tl.float32) * (SIGN * exp2(b_g))[None, :]
        # as the forward: the chunk's product from zero, added with the compensation term
        b_dhc = mesa_dot(b_a, b_b, tl.zeros([BK, BW], dtype=tl.float32), PREC, B_IS_BF16)
        b_dh, b_dh_lo = _decay_add(b_dh, b_dh_lo, exp2(b_g_last), b_dhc)

    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_nh * K * W + o_k[:, None] * W + o_w[None, :], b_dh, mask=m_kw)


@triton.jit
def _state_program(chunk_offsets, cu_seqlens, T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BW: tl.constexpr, IS_VARLEN: tl.constexpr):
    # program axis 0 walks the column blocks of [h_kk | h_kv] (BW wide) times the row blocks (BK high); `i_w`
    # below `NWK` is a block of h_kk, else of h_kv
    i_kw, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    NK = tl.cdiv(K, BK)
    i_k, i_w = i_kw % NK, i_kw // NK
    i_n, i_h = i_nh // H, i_nh % H
    # the sequence's first token, length, and first chunk (of h_kk)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n * T
        boh = i_n * tl.cdiv(T, BT)
    return i_k, i_w, tl.cdiv(K, BW), i_n, i_h, bos, T, tl.cdiv(T, BT), boh


def _sequences(B, T, cu_seqlens, chunk_indices, BT):
    """`(N, NT, chunk_offsets)`: the sequences, the chunks of all of them, and each one's first chunk (varlen)."""
    if cu_seqlens is None:
        return B, triton.cdiv(T, BT), None
    chunk_offsets = prepare_chunk_offsets(cu_seqlens, BT)
    NT = len(chunk_indices) if chunk_indices is not None else int(chunk_offsets[-1].item())
    return len(cu_seqlens) - 1, NT, chunk_offsets


def _state_grid(K, V, NH):
    def grid(meta):
        nk = triton.cdiv(K, meta['BK'])
        return (nk * (triton.cdiv(K, meta['BW']) + triton.cdiv(V, meta['BW'])), NH)
    return grid


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
@triton.autotune(configs=state_configs(), key=['K', 'V', 'BT', 'PREC'], **autotune_cache_kwargs)
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
    i_k, i_w, NWK, i_n, i_h, bos, T, NT, boh = _state_program(chunk_offsets, cu_seqlens, T, H, K, BT, BK, BW, IS_VARLEN)

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


def chunk_mesa_fwd_states(
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
    N, NT, chunk_offsets = _sequences(B, T, cu_seqlens, chunk_indices, BT)
    k, v, g_cum, beta = (x.contiguous() for x in (k, v, g_cum, beta))
    h0_kk = h0_kv = None
    if initial_state is not None:
        h0_kk, h0_kv = (x.contiguous() for x in initial_state)

    h_kk = k.new_empty(B, NT, H, K, K, dtype=torch.float32)
    h_kv = k.new_empty(B, NT, H, K, V, dtype=torch.float32)
    ht_kk = k.new_empty(N, H, K, K, dtype=torch.float32) if output_final_state else None
    ht_kv = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None

    grid = _state_grid(K, V, N * H)
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
        enable_fp_fusion=STATE_FP_FUSION,
    )
    return h_kk, h_kv, ((ht_kk, ht_kv) if output_final_state else None)


@triton.heuristics({
    'USE_DHT_KK': lambda args: args['dht_kk'] is not None,
    'USE_DHT_KV': lambda args: args['dht_kv'] is not None,
    'STORE_DH0': lambda args: args['dh0_kk'] is not None,
    'IS_VARLEN': lambda args: args['cu_seqlens'] is not None,
})
@triton.autotune(configs=state_configs(), key=['K', 'V', 'BT', 'PREC'], **autotune_cache_kwargs)
@triton.jit(do_not_specialize=['T'])
def chunk_mesa_bwd_kernel_dh(
    x,
    e,
    do,
    g,
    dh_kk,
    dh_kv,
    dht_kk,
    dht_kv,
    dh0_kk,
    dh0_kv,
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
    DO_IS_BF16: tl.constexpr,
    USE_DHT_KK: tl.constexpr,
    USE_DHT_KV: tl.constexpr,
    STORE_DH0: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_k, i_w, NWK, i_n, i_h, bos, T, NT, boh = _state_program(chunk_offsets, cu_seqlens, T, H, K, BT, BK, BW, IS_VARLEN)

    if i_w < NWK:
        # dH_t = −e_t x_tᵀ (unsymmetrised: A_t x_t uses H_t x_t)
        _chunk_mesa_bwd_dh_block(
            e, x, g, dh_kk, dht_kk, dh0_kk, i_k, i_w, i_n, i_h, bos, T, NT, boh,
            H, K, K, BT, BK, BW, PREC, -1.0, False, USE_DHT_KK, STORE_DH0,
        )
    else:
        # dS_t = x_t do_tᵀ
        _chunk_mesa_bwd_dh_block(
            x, do, g, dh_kv, dht_kv, dh0_kv, i_k, i_w - NWK, i_n, i_h, bos, T, NT, boh,
            H, K, V, BT, BK, BW, PREC, 1.0, DO_IS_BF16, USE_DHT_KV, STORE_DH0,
        )


def chunk_mesa_bwd_dh(
    x: torch.Tensor,
    e: torch.Tensor,
    do: torch.Tensor,
    g_cum: torch.Tensor,
    dht: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    output_dh0: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    precision: str | None = None,
):
    r"""
    The gradients of the surrogate with respect to the state after every chunk, `dh_kk [B, NT, H, K, K]` (of H, from
    `−e_t x_tᵀ`) and `dh_kv [B, NT, H, K, V]` (of S, from `x_t do_tᵀ`), float32, plus the initial-state gradients
    `(dh0_kk, dh0_kv)` when `output_dh0` (else `None`). Arguments as for `chunk_mesa_fwd_states`; `precision` defaults to
    `STATE_DOT_PRECISION` ('auto'), and `chunk_mesa_bwd_grads` passes the backward's.
    """
    B, T, H, K = x.shape
    V = do.shape[-1]
    BT = chunk_size
    precision = resolve_precision(precision, STATE_DOT_PRECISION, do)
    N, NT, chunk_offsets = _sequences(B, T, cu_seqlens, chunk_indices, BT)
    x, e, do, g_cum = (t.contiguous() for t in (x, e, do, g_cum))
    dht_kk, dht_kv = (None, None) if dht is None else dht
    dht_kk = None if dht_kk is None else dht_kk.contiguous()
    dht_kv = None if dht_kv is None else dht_kv.contiguous()
    dh_kk = x.new_empty(B, NT, H, K, K, dtype=torch.float32)
    dh_kv = x.new_empty(B, NT, H, K, V, dtype=torch.float32)
    dh0_kk = x.new_empty(N, H, K, K, dtype=torch.float32) if output_dh0 else None
    dh0_kv = x.new_empty(N, H, K, V, dtype=torch.float32) if output_dh0 else None

    grid = _state_grid(K, V, N * H)
    chunk_mesa_bwd_kernel_dh[grid](
        x=x, e=e, do=do, g=g_cum, dh_kk=dh_kk, dh_kv=dh_kv, dht_kk=dht_kk, dht_kv=dht_kv,
        dh0_kk=dh0_kk, dh0_kv=dh0_kv, cu_seqlens=cu_seqlens, chunk_offsets=chunk_offsets,
        T=T, H=H, K=K, V=V, BT=BT, PREC=precision, DO_IS_BF16=do.dtype == torch.bfloat16,
        enable_fp_fusion=STATE_FP_FUSION,
    )
    return dh_kk, dh_kv, ((dh0_kk, dh0_kv) if output_dh0 else None)
