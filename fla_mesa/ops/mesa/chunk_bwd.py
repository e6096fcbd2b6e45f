# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Backward kernels of the Mesa chunk path (README "Backward: implicit differentiation").

With the forward solution x and the adjoint solution e (`dx_t = S_t do_t`'s solve) held fixed, `chunk_mesa_bwd_grads`
takes the gradients of the surrogate `L̃ = Σ_t [do_tᵀ S_tᵀ x_t − e_tᵀ (H_t + Λ) x_t] + <dH_T, H_T> + <dS_T, S_T>`:
the reverse state pass (`chunk_h.chunk_mesa_bwd_dh`) carries the state gradients from chunk to chunk, then one
program per (chunk, head) forms dk, dv, dg, dβ and dλ from them.

Notation inside a chunk (rows i are "query" positions, columns j "key" positions, Γ the in-chunk cumulative
log-decay): `A_ij = e^{Γ_i − Γ_j}` for j <= i, `dS'`, `dH'` the gradients of the state after the chunk.

    dv_j = β_j [Σ_i A_ij (x_i·k_j) do_i + e^{Γ_C − Γ_j} dS'ᵀ k_j]
    dk_j = β_j [Σ_i A_ij ((do_i·v_j) x_i − (e_i·k_j) x_i − (x_i·k_j) e_i) + e^{Γ_C − Γ_j} (dS' v_j + (dH' + dH'ᵀ) k_j)]
    dβ_j = k_j · (S part of dk_j / β_j + ½ H part of dk_j / β_j)
    dg_t = Σ_{j<t<=i} A_ij β_j (do_i·v_j − e_i·k_j)(k_j·x_i) + Σ_{i>=t} e^{Γ_i} (do_i·S_cᵀ x_i − e_i·H_c x_i)
           + Σ_{j<t} β_j e^{Γ_C − Γ_j} (k_j·dS' v_j + k_jᵀ dH' k_j) + e^{Γ_C} (<dS', S_c> + <dH', H_c>)
    (each term summed over the decays that g_t enters, so no large ± terms cancel)

Every quantity is linear in (do, dH_T, dS_T) at fixed x and e, with no absolute epsilon: gradients of any scale keep
their relative accuracy. The products' operand precision (`BWD_DOT_PRECISION`, default 'auto'): with fp32 inputs
'tf32x3' was as accurate as 'ieee' and faster, so 'auto' takes tf32x3 there, and bf16x3 for 16-bit inputs
(benchmarks/results/chunk_bwd_kernels_h100.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.ops.utils import prepare_chunk_indices
from fla.utils import autotune_cache_kwargs

from fla_mesa.ops.mesa.chunk_h import chunk_mesa_bwd_dh
from fla_mesa.ops.mesa.kernel_utils import chunk_program, exp2, mesa_dot, resolve_precision, round_bf16
from fla_mesa.utils import is_interpreting

# operand precision of every product in the backward; 'auto': tf32x3 (tensor cores, ~fp32) for fp32 inputs, bf16x3
# for 16-bit ones
BWD_DOT_PRECISION = 'auto'


def _grads_configs():
    # BK, BV: the dk/dv columns of one program (its slice); BC: the inner loops' block, small to keep the
    # [BC, BK] state blocks (and their split operands) out of local memory
    if is_interpreting():
        return [triton.Config({'BK': 32, 'BV': 32, 'BC': 16}, num_warps=4, num_stages=1)]
    # not BK = BV = 32 with BC = 16 at 8 warps: Triton 3.6 miscompiles it on Hopper with bf16 inputs (inf at K32 V16,
    # illegal memory access elsewhere; benchmarks/results/gpu_tests_h200.md). Two and three stages: the inner loops'
    # next blocks load while the current ones multiply
    return [
        triton.Config({'BK': B, 'BV': B, 'BC': BC}, num_warps=num_warps, num_stages=num_stages)
        for B, BC, num_warps, num_stages in [(32, 32, 4, 1), (32, 32, 8, 1), (64, 32, 4, 1), (64, 32, 8, 1),
                                             (64, 16, 8, 1), (64, 32, 4, 2), (64, 32, 4, 3)]
    ]


# the narrowest slice (BK, BV) of any grads config: the host allocates room for the dg, dβ shares of that many slices
GRADS_MIN_BLOCK = 32


@triton.heuristics({'IS_VARLEN': lambda args: args['cu_seqlens'] is not None})
@triton.autotune(configs=_grads_configs(), key=['K', 'V', 'BT', 'PREC'], **autotune_cache_kwargs)
@triton.jit(do_not_specialize=['T', 'NTOK'])
def chunk_mesa_bwd_kernel_grads(
    x,
    e,
    do,
    k,
    v,
    g,
    beta,
    h_kk,
    h_kv,
    dh_kk,
    dh_kv,
    dk,
    dv,
    dg,
    dbeta,
    dlamb,
    cu_seqlens,
    chunk_indices,
    T,
    NTOK,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    NS: tl.constexpr,
    PREC: tl.constexpr,
    K_IS_BF16: tl.constexpr,
    V_IS_BF16: tl.constexpr,
    DO_IS_BF16: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # one program per (slice, chunk, head), see the module docstring for the formulas: slice i_s writes the i_s-th
    # blocks of dk (BK columns) and dv (BV columns) and its share of dg, dβ; each slice recomputes the chunk's
    # [BT, BT] products, which need every column
    i_s, i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_tg, i_t, bos, T = chunk_program(i_t, i_b, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    NK = tl.cdiv(K, BK)
    NV = tl.cdiv(V, BV)

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_g = tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0.).to(tl.float32)
    b_beta = tl.load(beta + (bos + o_t) * H + i_h, mask=m_t, other=0.).to(tl.float32)
    i_last = tl.minimum((i_t + 1) * BT, T) - 1
    b_g_last = tl.load(g + (bos + i_last) * H + i_h).to(tl.float32)
    # e^{Γ_i} (state -> token i), e^{Γ_C − Γ_j} (token j -> state after the chunk)
    b_gq = exp2(b_g)
    b_gk = tl.where(m_t, exp2(b_g_last - b_g), 0.)

    x += (bos * H + i_h) * K
    e += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    dk += (bos * H + i_h) * K
    do += (bos * H + i_h) * V
    v += (bos * H + i_h) * V
    dv += (bos * H + i_h) * V
    h_kk += (i_tg * H + i_h) * K * K
    dh_kk += (i_tg * H + i_h) * K * K
    h_kv += (i_tg * H + i_h) * K * V
    dh_kv += (i_tg * H + i_h) * K * V

    # 1) X Kᵀ, E Kᵀ, DO Vᵀ (every slice)
    b_xk = tl.zeros([BT, BT], dtype=tl.float32)
    b_ek = tl.zeros([BT, BT], dtype=tl.float32)
    for i_r in range(0, tl.cdiv(K, BC)):
        o_k = tl.cast(i_r, tl.int64) * BC + tl.arange(0, BC)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_x = tl.load(x + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
        b_e = tl.load(e + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
        b_k = tl.load(k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
        b_xk = mesa_dot(b_x, tl.trans(b_k), b_xk, PREC, K_IS_BF16)
        b_ek = mesa_dot(b_e, tl.trans(b_k), b_ek, PREC, K_IS_BF16)
    b_dov = tl.zeros([BT, BT], dtype=tl.float32)
    for i_r in range(0, tl.cdiv(V, BC)):
        o_v = tl.cast(i_r, tl.int64) * BC + tl.arange(0, BC)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.)
        b_v = tl.load(v + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.)
        b_dov = mesa_dot(b_do, tl.trans(b_v), b_dov, PREC, V_IS_BF16, DO_IS_BF16)
    # [BT, BT] A_ij; padded rows/columns masked before exp2 could overflow into inf * 0 (formed after the products,
    # and the products' raw forms dropped early: [BT, BT] fp32 tiles are what fills the registers)
    m_tt = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_a = tl.where(m_tt, exp2(b_g[:, None] - b_g[None, :]), 0.)
    b_axk = b_xk * b_a
    # D = A ⊙ (DO Vᵀ − E Kᵀ): dk's intra-chunk part is Dᵀ X − (A ⊙ X Kᵀ)ᵀ E, so two [BT, BT] tiles stay live
    b_d = (b_dov - b_ek) * b_a
    o_i = tl.arange(0, BT)
    b_dg = tl.zeros([BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    if i_s == 0:
        # dβ's intra-chunk part: k_j·(S part + ½ H part of dk_j/β_j) = Σ_i D_ij (x_i·k_j)
        b_dx = b_d * b_xk
        b_dbeta = tl.sum(b_dx, 0)
        # dg, intra-chunk pairs: g_t enters the decay A_ij of every pair j < t <= i, so dg_t = Σ_{j<t<=i} T_ij with
        # T_ij = D_ij β_j (k_j·x_i): summed directly (no cancelling ±T terms), as (T U) with U_jt = [j < t], then
        # over i >= t (U holds 0 and 1, exact in bf16: its low part is zero and skipped)
        b_tm = tl.where(o_i[:, None] > o_i[None, :], b_dx * b_beta[None, :], 0.)
        b_u = (o_i[:, None] < o_i[None, :]).to(tl.float32)
        b_tu = mesa_dot(b_tm, b_u, tl.zeros([BT, BT], dtype=tl.float32), PREC, True)
        b_dg = tl.sum(tl.where(o_i[:, None] >= o_i[None, :], b_tu, 0.), 0)
    # e^{Γ_C} (<dS', S_c> + <dH', H_c>)
    b_last = tl.zeros([], dtype=tl.float32)

    # 2) this slice's V block: dv, and the query side's e^{Γ_i} do_i·(S_cᵀ x_i)
    b_dgs = tl.zeros([BT], dtype=tl.float32)
    if i_s < NV:
        o_v = i_s * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.)
        b_xs = tl.zeros([BT, BV], dtype=tl.float32)
        b_kds = tl.zeros([BT, BV], dtype=tl.float32)
        for i_r in range(0, tl.cdiv(K, BC)):
            o_k = tl.cast(i_r, tl.int64) * BC + tl.arange(0, BC)
            m_k = o_k < K
            m_tk = m_t[:, None] & m_k[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            b_x = tl.load(x + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
            b_k = tl.load(k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
            b_s = tl.load(h_kv + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
            b_ds = tl.load(dh_kv + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)
            b_xs = mesa_dot(b_x, b_s, b_xs, PREC, False)
            b_kds = mesa_dot(b_k, b_ds, b_kds, PREC, False, K_IS_BF16)
            b_last += tl.sum(b_s * b_ds)
        b_dgs += tl.sum(b_do.to(tl.float32) * b_xs, 1)
        b_dv = mesa_dot(tl.trans(b_axk), b_do, b_kds * b_gk[:, None], PREC, DO_IS_BF16)
        # in v's dtype (rounded to nearest here: the interpreter's cast truncates)
        b_dv *= b_beta[:, None]
        if V_IS_BF16:
            b_dv = round_bf16(b_dv)
        tl.store(dv + o_t[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)

    # 3) this slice's K block: dk, dλ = −Σ e ⊙ x (per chunk, summed on the host), the inter-chunk part of dβ, and
    # the query side's −e^{Γ_i} e_i·(H_c x_i)
    # Σ over the key side's inter-chunk terms (k_j·dS' v_j + k_jᵀ dH' k_j) e^{Γ_C − Γ_j}, for the last token's dΓ
    b_dbi = tl.zeros([BT], dtype=tl.float32)
    if i_s < NK:
        o_k = i_s * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        # inter-chunk S part e^{Γ_C − Γ_j} dS' v_j
        b_dks = tl.zeros([BT, BK], dtype=tl.float32)
        for i_r in range(0, tl.cdiv(V, BC)):
            o_v = tl.cast(i_r, tl.int64) * BC + tl.arange(0, BC)
            m_v = o_v < V
            b_v = tl.load(v + o_t[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
            # [BC, BK] dS'ᵀ
            b_dst = tl.load(dh_kv + o_k[None, :] * V + o_v[:, None], mask=m_v[:, None] & m_k[None, :], other=0.)
            b_dks = mesa_dot(b_v, b_dst, b_dks, PREC, False, V_IS_BF16)
        # inter-chunk H part e^{Γ_C − Γ_j} (dH' + dH'ᵀ) k_j, and X H_cᵀ
        b_dkh = tl.zeros([BT, BK], dtype=tl.float32)
        b_xh = tl.zeros([BT, BK], dtype=tl.float32)
        for i_r in range(0, tl.cdiv(K, BC)):
            o_r = tl.cast(i_r, tl.int64) * BC + tl.arange(0, BC)
            m_r = o_r < K
            m_rk = m_r[:, None] & m_k[None, :]
            b_kr = tl.load(k + o_t[:, None] * (H * K) + o_r[None, :], mask=m_t[:, None] & m_r[None, :], other=0.)
            b_xr = tl.load(x + o_t[:, None] * (H * K) + o_r[None, :], mask=m_t[:, None] & m_r[None, :], other=0.)
            # [BC (r), BK (k)] blocks dH'[r, k], dH'[k, r], H_c[k, r]
            b_dh1 = tl.load(dh_kk + o_r[:, None] * K + o_k[None, :], mask=m_rk, other=0.)
            b_dh2 = tl.load(dh_kk + o_k[None, :] * K + o_r[:, None], mask=m_rk, other=0.)
            b_ht = tl.load(h_kk + o_k[None, :] * K + o_r[:, None], mask=m_rk, other=0.)
            b_dkh = mesa_dot(b_kr, b_dh1 + b_dh2, b_dkh, PREC, False, K_IS_BF16)
            b_xh = mesa_dot(b_xr, b_ht, b_xh, PREC, False)
            b_last += tl.sum(b_dh2 * b_ht)
        b_k = tl.load(k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.).to(tl.float32)
        b_x = tl.load(x + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
        b_e = tl.load(e + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.)
        b_dki = b_dks + 0.5 * b_dkh
        b_kdi = tl.sum(b_k * b_dki, 1) * b_gk
        b_dbi += b_kdi
        b_dbeta += b_kdi
        b_dgs -= tl.sum(b_e * b_xh, 1)
        # intra-chunk part Dᵀ X − (A ⊙ X Kᵀ)ᵀ E
        b_dk = mesa_dot(tl.trans(b_d), b_x, (b_dks + b_dkh) * b_gk[:, None], PREC, False)
        b_dk = mesa_dot(tl.trans(-b_axk), b_e, b_dk, PREC, False)
        b_dk *= b_beta[:, None]
        if K_IS_BF16:
            b_dk = round_bf16(b_dk)
        tl.store(dk + o_t[:, None] * (H * K) + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tk)
        tl.store(dlamb + (i_tg * H + i_h) * K + o_k, -tl.sum(b_e * b_x, 0), mask=m_k)

    # dg_t, the other terms, each summed where g_t enters: the state-to-token decays e^{Γ_i} of tokens i >= t, the
    # token-to-next-state decays e^{Γ_C − Γ_j} of tokens j < t, and the state-to-next-state decay e^{Γ_C}
    b_dg += tl.sum(tl.where(o_i[:, None] >= o_i[None, :], (b_gq * b_dgs)[:, None], 0.), 0)
    b_dg += tl.sum(tl.where(o_i[:, None] < o_i[None, :], (b_beta * b_dbi)[:, None], 0.), 0)
    b_dg += exp2(b_g_last) * b_last
    # this slice's shares, summed on the host
    tl.store(dg + i_s * NTOK * H + (bos + o_t) * H + i_h, b_dg, mask=m_t)
    tl.store(dbeta + i_s * NTOK * H + (bos + o_t) * H + i_h, b_dbeta, mask=m_t)
    # the host sums all NS shares it allocated, whichever config ran: the last slice zeroes those past this config's
    if i_s == tl.maximum(NK, NV) - 1:
        for i_z in range(tl.maximum(NK, NV), NS):
            tl.store(dg + i_z * NTOK * H + (bos + o_t) * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m_t)
            tl.store(dbeta + i_z * NTOK * H + (bos + o_t) * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m_t)


def _check_precision(precision, ref):
    return resolve_precision(precision, BWD_DOT_PRECISION, ref)


def _num_chunks(T, cu_seqlens, chunk_indices, BT):
    if cu_seqlens is None:
        return triton.cdiv(T, BT), None
    if chunk_indices is None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, BT)
    return len(chunk_indices), chunk_indices


def chunk_mesa_bwd_grads(
    x: torch.Tensor,
    e: torch.Tensor,
    do: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cum: torch.Tensor,
    beta: torch.Tensor,
    h_kk: torch.Tensor,
    h_kv: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    dht: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    precision: str | None = None,
):
    r"""
    Gradients of the implicit-differentiation surrogate
    `L̃ = Σ_t [do_tᵀ S_tᵀ x_t − e_tᵀ (H_t + Λ) x_t] + <dht_kk, H_T> + <dht_kv, S_T>` (x, e fixed).

    Args:
        x (torch.Tensor): forward solutions `[B, T, H, K]`.
        e (torch.Tensor): adjoint solutions `[B, T, H, K]`.
        do (torch.Tensor): `[B, T, H, V]`.
        k, v, g_cum, beta: as for `chunk_o.chunk_mesa_bwd_dx` (g_cum: in-chunk cumsum of g, log2 space).
        h_kk, h_kv (torch.Tensor): chunk-start states `[B, NT, H, K, K]`, `[B, NT, H, K, V]` float32.
        initial_state (Tuple[torch.Tensor, torch.Tensor], Optional): if given, its gradient is returned.
        dht (Tuple, Optional): `(dht_kk [N, H, K, K] or None, dht_kv [N, H, K, V] or None)`.
        cu_seqlens, chunk_indices, chunk_size: as in fla.
        precision (str, Optional): operand precision of the products. Default: `BWD_DOT_PRECISION` ('auto').

    Returns:
        dk `[B, T, H, K]` in the dtype of k, dv `[B, T, H, V]` in the dtype of v, and in float32 dg `[B, T, H]`
        (of the raw natural-log g), dbeta `[B, T, H]`, dlamb `[H, K]`, dh0 (`(dh0_kk, dh0_kv)` or `None`).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = chunk_size
    precision = _check_precision(precision, k)
    NT, chunk_indices = _num_chunks(T, cu_seqlens, chunk_indices, BT)
    kw = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size, precision=precision)
    dh_kk, dh_kv, dh0 = chunk_mesa_bwd_dh(x, e, do, g_cum, dht=dht, output_dh0=initial_state is not None, **kw)

    x, e, do, k, v, g_cum, beta, h_kk, h_kv = (t.contiguous() for t in (x, e, do, k, v, g_cum, beta, h_kk, h_kv))
    # dk, dv in the dtypes of k, v: no cast pass after the kernel
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # the shares of dg and dβ of every slice (K/V column block), room for as many as the narrowest configured slice
    # gives, and per-chunk partial sums of dλ, all reduced below (no atomics)
    NS = max(triton.cdiv(K, GRADS_MIN_BLOCK), triton.cdiv(V, GRADS_MIN_BLOCK))
    dg = k.new_empty(NS, B, T, H, dtype=torch.float32)
    dbeta = k.new_empty(NS, B, T, H, dtype=torch.float32)
    dlamb = k.new_empty(B * NT, H, K, dtype=torch.float32)

    def grid(meta):
        return (max(triton.cdiv(K, meta['BK']), triton.cdiv(V, meta['BV'])), NT, B * H)

    chunk_mesa_bwd_kernel_grads[grid](
        x=x, e=e, do=do, k=k, v=v, g=g_cum, beta=beta, h_kk=h_kk, h_kv=h_kv, dh_kk=dh_kk, dh_kv=dh_kv,
        dk=dk, dv=dv, dg=dg, dbeta=dbeta, dlamb=dlamb, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices,
        T=T, NTOK=B * T, H=H, K=K, V=V, NS=NS, BT=BT, PREC=precision,
        K_IS_BF16=k.dtype == torch.bfloat16, V_IS_BF16=v.dtype == torch.bfloat16, DO_IS_BF16=do.dtype == torch.bfloat16,
    )
    return dk, dv, dg.sum(0), dbeta.sum(0), dlamb.sum(0), dh0
