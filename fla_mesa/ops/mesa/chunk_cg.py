# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The chunk path's CG solve `(H_t + Λ) x_t = b_t` (README "The solver"); the readout is `chunk_o`'s pass."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from fla.ops.utils import prepare_chunk_indices
from fla.utils import autotune_cache_kwargs, get_multiprocessor_count

from fla_mesa.ops.mesa.kernel_utils import (
    INTERPRETING, chunk_end_state, chunk_program, exp2, mesa_dot, mesa_dot_split, mesa_split, readout_products,
    resolve_precision, round_bf16, round_tf32, sum2,
)
from fla_mesa.ops.mesa.chunk_o import chunk_mesa_bwd_dx, chunk_mesa_fwd_o
from fla_mesa.ops.mesa.factor import chunk_start_factor_triton
from fla_mesa.ops.mesa.precond import (
    FACTOR_DTYPE, JACOBI_STALL_FF2, chunk_end_states, chunk_start_factor, is_precondition,
)
from fla_mesa.ops.mesa.utils import residual_floor2
from fla_mesa.utils import is_interpreting

# operand precision of the products inside the CG loop (op README, "Solver precision", has the study). 'auto':
# tf32x3 (fp32 level) for fp32 keys; bf16x3 for 16-bit keys, faster and far under their own rounding
CG_DOT_PRECISION = 'auto'
# rounded directions (op README, "Rounded CG directions"): with split products, each step's direction p is rounded to
# the split's high part, so A p needs 5 products instead of 7 at the same accuracy; `chunk_mesa_cg`'s
# `round_directions=False` keeps the unrounded ones
CG_ROUND_DIRECTIONS = True


@triton.jit
def _chunk_mesa_matvec(
    b_p,
    b_k_hi,
    b_k_lo,
    b_m,
    b_e,
    b_lamb,
    b_h_hi,
    b_h_lo,
    p_ht,
    m_kk,
    PREC: tl.constexpr,
    K_IS_BF16: tl.constexpr,
    H_IN_LOOP: tl.constexpr,
    P_EXACT: tl.constexpr,
):
    # A_t p_t = e^Γ H_c p_t + Σ_j M_tj k_j (k_jᵀ p_t) + λ ⊙ p_t, for the rows of the tile at once; the loop
    # invariants (k, H_c) come split already (`mesa_split`), so each step splits only what changes; `P_EXACT`: p
    # holds split-high values (a rounded direction), its low part is zero and its products are skipped
    if H_IN_LOOP:
        # large K: H_c does not fit on chip; it is re-read (from L2) every step
        b_h_hi, b_h_lo = mesa_split(tl.load(p_ht, mask=m_kk, other=0.), PREC)
    b_p_hi, b_p_lo = mesa_split(b_p, PREC)
    b_pk = mesa_dot_split(b_p_hi, b_p_lo, tl.trans(b_k_hi), tl.trans(b_k_lo),
                          tl.zeros(b_m.shape, dtype=tl.float32), PREC, P_EXACT, K_IS_BF16) * b_m
    b_pk_hi, b_pk_lo = mesa_split(b_pk, PREC)
    b_w = mesa_dot_split(b_pk_hi, b_pk_lo, b_k_hi, b_k_lo, b_lamb[None, :] * b_p, PREC, False, K_IS_BF16)
    # e^Γ_t scales a row: (e ⊙ p) H = e ⊙ (p H), so p's split (and its copy in shared memory) serves both products
    b_ph = mesa_dot_split(b_p_hi, b_p_lo, b_h_hi, b_h_lo, tl.zeros(b_p.shape, dtype=tl.float32), PREC, P_EXACT, False)
    return b_w + b_e[:, None] * b_ph


@triton.jit
def _apply_factor(b_r, b_f_hi, b_f_lo, PREC: tl.constexpr, F_EXACT: tl.constexpr):
    # the chunk preconditioner z = M⁻¹ r = (r W) Wᵀ for the rows of the tile (`precond.chunk_start_factor`);
    # `F_EXACT`: W holds split-high values (bf16), its low part is zero and its products are skipped
    b_r_hi, b_r_lo = mesa_split(b_r, PREC)
    b_u = mesa_dot_split(b_r_hi, b_r_lo, b_f_hi, b_f_lo, tl.zeros(b_r.shape, dtype=tl.float32), PREC, False, F_EXACT)
    b_u_hi, b_u_lo = mesa_split(b_u, PREC)
    return mesa_dot_split(b_u_hi, b_u_lo, tl.trans(b_f_hi), tl.trans(b_f_lo), tl.zeros(b_r.shape, dtype=tl.float32),
                          PREC, False, F_EXACT)


@triton.jit
def _round_hi(a, PREC: tl.constexpr):
    # to the nearest value of a split's high part (`mesa_split`), still fp32; on the GPU by its bf16 conversion (one
    # instruction per two values; `round_bf16`'s integer arithmetic takes four), which the interpreter truncates
    if PREC == 'bf16x3' and not INTERPRETING:
        return a.to(tl.bfloat16).to(tl.float32)
    elif PREC == 'bf16x3':
        return round_bf16(a)
    else:
        return round_tf32(a)


def _cg_configs():
    # NR programs per chunk, BT // NR rows each: fewer rows per program, less register pressure (the study:
    # benchmarks/results/cg_kernel_study_h100.md). Not NR = 1 at 4 warps: with bf16 keys Triton 3.6 miscompiles it
    # on Hopper (benchmarks/results/gpu_tests_h200.md), and at K = V = 128 it was never the fastest
    if is_interpreting():
        return [triton.Config({'NR': 1}, num_warps=4, num_stages=1)]
    return [triton.Config({'NR': NR}, num_warps=num_warps, num_stages=1) for NR, num_warps in [(2, 8), (4, 4), (4, 8)]]


# what changes the best config: the sizes, and the work of a CG step (its products' precision, the preconditioner's
# products, rounded directions); the autotuner adds every tensor argument's dtype (k, v, o, do, the factor) itself
CG_KEY = ['K', 'BT', 'PREC', 'PRECONDITION', 'ROUND_P', 'RESCUE']


@triton.jit
def _jacobi_scale(p_h, p_e, lamb, b_a, o, m, K: tl.constexpr):
    # u_i = 1 / (a (H_c + H_{c+1})_ii + λ_i) at the indices `o`: the stall score's Jacobi scaling (padded entries 1)
    return 1. / (b_a * (tl.load(p_h + o * (K + 1), mask=m, other=0.) + tl.load(p_e + o * (K + 1), mask=m, other=0.))
                 + tl.load(lamb + o, mask=m, other=1.).to(tl.float32))


@triton.jit
def chunk_stall_kernel(h_kk, ht_kk, g, lamb, need, cu_seqlens, chunk_indices, T, NT, H: tl.constexpr, K: tl.constexpr,
                       BK: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr, STALL_FF2: tl.constexpr,
                       IS_VARLEN: tl.constexpr):
    # precondition='auto': `precond.jacobi_stall_score` of one chunk and head's a_c (H_c + H_{c+1}) / 2 + Λ
    # (`ChunkPieces.stall_score`, a_c the decay to the chunk's middle token); above STALL_FF2 Jacobi is predicted to
    # stall and the chunk and head are marked 2 (the first pass skips them, the second solves them with the chunk
    # factor). A pass of its own, ahead of the first CG pass, so that the CG kernels carry no K x K temporaries for
    # it; the backward reuses the forward's marks. Padded columns (H 0, λ 1) add nothing.
    i_c, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    if IS_VARLEN:
        _, i_t, bos, T = chunk_program(i_c, 0, chunk_indices, cu_seqlens, T, BT, True)
    else:
        _, i_t, bos, T = chunk_program(i_c % NT, i_c // NT, chunk_indices, cu_seqlens, T, BT, False)
    b_a = 0.5 * exp2(tl.load(g + (bos + tl.minimum(i_t * BT + BT // 2, T - 1)) * H + i_h))
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    p_h = h_kk + (i_c * H + i_h) * K * K
    p_e = chunk_end_state(h_kk, ht_kk, chunk_indices, i_c, i_h, NT, H, K * K, IS_VARLEN)
    b_u = _jacobi_scale(p_h, p_e, lamb + i_h * K, b_a, o_k, m_k, K)
    # BR rows at a time (small programs, many resident: the pass is bound by its loads); the states are symmetric,
    # so the entries above the diagonal, twice
    b_ff = tl.zeros([BR, BK], dtype=tl.float32)
    for i_r in range(0, tl.cdiv(K, BR)):
        o_r = i_r * BR + tl.arange(0, BR)
        m_r = o_r < K
        m_up = m_r[:, None] & m_k[None, :] & (o_r[:, None] < o_k[None, :])
        o_rk = o_r[:, None] * K + o_k[None, :]
        b_ah = b_a * (tl.load(p_h + o_rk, mask=m_up, other=0.) + tl.load(p_e + o_rk, mask=m_up, other=0.))
        b_ff += b_ah * b_ah * _jacobi_scale(p_h, p_e, lamb + i_h * K, b_a, o_r, m_r, K)[:, None] * b_u[None, :]
    if 2 * tl.sum(tl.sum(b_ff, 1), 0) > STALL_FF2:
        tl.store(need + i_c * H + i_h, 2)


@triton.jit
def rescue_items_kernel(need, items, N, BLOCK: tl.constexpr):
    # precondition='auto': the entries of the `[chunks, H]` map that the second pass solves (nonzero), appended to
    # `items` after their count `items[0]` (zeroed by the caller); the order is the atomics', and no result depends on it
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b_f = (tl.load(need + o, mask=o < N, other=0) != 0).to(tl.int32)
    base = tl.atomic_add(items, tl.sum(b_f, 0))
    tl.store(items + 1 + base + tl.cumsum(b_f, 0) - b_f, o.to(tl.int32), mask=b_f != 0)


@functools.lru_cache
def _rescue_programs(device_index):
    # the second pass's program count: a few a multiprocessor (the interpreter: 3, so that its programs loop)
    return 3 if is_interpreting() else 4 * get_multiprocessor_count(device_index)


def _prune_cg_configs(configs, named_args, **kwargs):
    # at least 16 rows per program (the smallest tl.dot); a 16-token chunk gets one 16-row program (below 64 rows
    # Triton does not use wgmma, so 4 warps are safe there)
    kept = [c for c in configs if kwargs['BT'] // c.kwargs['NR'] >= 16]
    return kept or [triton.Config({'NR': max(kwargs['BT'] // 16, 1)}, num_warps=4, num_stages=1)]


@triton.jit
def _rescue_rows(need, steps, i_c, bos, o_r, m_r, H: tl.constexpr, BR: tl.constexpr):
    # precondition='auto', second pass: (the rows to solve, the steps the first pass ran on them, whether the chunk
    # skipped the first pass: marked 2, every row from 0 steps)
    b_whole = (tl.load(need + i_c) + tl.zeros([BR], dtype=tl.int32)) == 2
    b_prev = tl.where(b_whole, 0, tl.load(steps + (bos + o_r) * H + i_c % H, mask=m_r, other=0))
    return (b_prev < 0) | b_whole, tl.where(b_prev < 0, -1 - b_prev, b_prev), b_whole


@triton.jit
def _chunk_mesa_cg_item(
    i_t,
    i_r,
    i_b,
    i_h,
    b,
    k,
    g,
    beta,
    lamb,
    h_kk,
    factor,
    need,
    v,
    h_kv,
    do,
    x,
    xl,
    steps,
    cu_seqlens,
    chunk_indices,
    max_steps,
    tol2,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    NR: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    PRECONDITION: tl.constexpr,
    ROUND_P: tl.constexpr,
    K_IS_BF16: tl.constexpr,
    V_IS_BF16: tl.constexpr,
    H_IN_LOOP: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    RHS_DX: tl.constexpr,
    DO_IS_BF16: tl.constexpr,
    FLAG_UNCONVERGED: tl.constexpr,
    F_IS_BF16: tl.constexpr,
    RESCUE: tl.constexpr,
    FIRST: tl.constexpr,
    XL: tl.constexpr,
):
    # the CG solve of one program's rows: BR rows of chunk `i_t` (the program's chunk axis: over every sequence's
    # chunks when varlen) of batch `i_b`, head `i_h`; the rows interact only through the chunk's keys
    BR: tl.constexpr = BT // NR
    i_tg, i_t, bos, T = chunk_program(i_t, i_b, chunk_indices, cu_seqlens, T, BT, IS_VARLEN)
    if FIRST:
        # precondition='auto', first pass: a chunk and head marked 2 (`skip_jacobi`, or a stall predicted by
        # `chunk_stall_kernel`) goes to the second pass whole, Jacobi skipped; the mark is read below, after the
        # chunk's first loads are issued, so that its latency hides behind theirs
        b_mark = tl.load(need + i_tg * H + i_h)

    # rows of this program and columns (all tokens of the chunk)
    o_r = i_t * BT + i_r * BR + tl.arange(0, BR)
    o_c = i_t * BT + tl.arange(0, BT)
    m_r = o_r < T
    m_c = o_c < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_rk = m_r[:, None] & m_k[None, :]
    m_kk = m_k[:, None] & m_k[None, :]

    # [BT, BK] the chunk's keys, in their own dtype
    b_k = tl.load(k + (bos * H + i_h) * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.)
    b_gr = tl.load(g + (bos + o_r) * H + i_h, mask=m_r, other=0.).to(tl.float32)
    b_gc = tl.load(g + (bos + o_c) * H + i_h, mask=m_c, other=0.).to(tl.float32)
    b_beta = tl.load(beta + (bos + o_c) * H + i_h, mask=m_c, other=0.).to(tl.float32)
    # padded columns get λ = 1: their d stays positive and p, x stay 0 there
    b_lamb = tl.load(lamb + i_h * K + o_k, mask=m_k, other=1.).to(tl.float32)
    if FIRST:
        if b_mark == 2:
            return
    # [BR, BT] M_ij = 2^(Γ_i − Γ_j) β_j for j <= i (Γ in log2 space)
    m_rc = (o_r[:, None] >= o_c[None, :]) & m_r[:, None] & m_c[None, :]
    b_m = tl.where(m_rc, exp2(b_gr[:, None] - b_gc[None, :]) * b_beta[None, :], 0.)
    b_e = exp2(b_gr)

    # [BK, BK] Hᵀ (so that P Hᵀ = (H p_t)_t, right also for a given unsymmetric h_kk)
    h_kk += (i_tg * H + i_h) * K * K
    p_ht = h_kk + o_k[:, None] + o_k[None, :] * K
    if H_IN_LOOP:
        b_h_hi = tl.zeros([BK, BK], dtype=tl.float32)
        b_h_lo = b_h_hi
    else:
        b_h_hi, b_h_lo = mesa_split(tl.load(p_ht, mask=m_kk, other=0.), PREC)
    b_hd = tl.load(h_kk + o_k * K + o_k, mask=m_k, other=0.)
    # diag(A_t) = e^Γ diag(H_c) + Σ_j M_tj k_j² + λ; it only scales the search (the start and Jacobi's z), so with
    # bf16 keys one bf16 product (~0.4% off) stands for bf16x3's three. tf32x3 keeps them: there the step counts
    # equal the PyTorch solver's (tests/ops/test_chunk_fwd_kernels.py)
    DIAG_PREC: tl.constexpr = 'bf16' if PREC == 'bf16x3' else PREC
    b_kf = b_k.to(tl.float32)
    b_d = mesa_dot(b_m, b_kf * b_kf, b_e[:, None] * b_hd[None, :] + b_lamb[None, :], DIAG_PREC, False)
    b_k_hi, b_k_lo = mesa_split(b_k, PREC)
    if PRECONDITION == 2:
        # [BK, BK] the chunk-start factor W (M_c⁻¹ = W Wᵀ), split once; padded rows and columns 0, so z is 0 there
        b_f_hi, b_f_lo = mesa_split(tl.load(factor + (i_tg * H + i_h) * K * K + o_k[:, None] * K + o_k[None, :],
                                            mask=m_kk, other=0.), PREC)
    else:
        b_f_hi = tl.zeros([BK, BK], dtype=tl.float32)
        b_f_lo = b_f_hi

    # per-row normalised right-hand side; an all-zero row is solved by x = 0 in 0 steps
    if RHS_DX:
        # the adjoint's second pass of 'auto' (its x buffer no longer holds dx): b_t = dx_t = e^{Γ_t} S_c do_t +
        # Σ_j M_tj k_j (v_j·do_t), formed here
        h_kv += (i_tg * H + i_h) * K * V
        b_dov, b_dx = readout_products(do, v, h_kv, bos, i_h, o_r, m_r, o_c, m_c, o_k, m_k, H, V, K, BV, PREC,
                                       DO_IS_BF16, V_IS_BF16, True)
        b_b = mesa_dot(b_dov * b_m, b_k, b_dx * b_e[:, None], PREC, K_IS_BF16)
    else:
        b_b = tl.load(b + (bos * H + i_h) * K + o_r[:, None] * (H * K) + o_k[None, :], mask=m_rk, other=0.).to(tl.float32)
    b_s = tl.sqrt(tl.sum(b_b * b_b, 1))
    m_nz = b_s > 0
    b_b = b_b / tl.where(m_nz, b_s, 1.)[:, None]

    # Jacobi start x0 = b / diag(A); the reciprocal once, a multiply per step (an fp32 division is ~10 instructions)
    b_dinv = 1. / b_d
    if RESCUE:
        # precondition='auto', second pass: only the rows the Jacobi pass left unconverged (stored ~steps), from its
        # iterate (any finite start converges to the same x: non-finite entries start at 0)
        # a chunk marked 2 skipped the first pass: every row, from the Jacobi start (what x and steps hold there,
        # unwritten, is not used)
        m_redo, _, b_whole = _rescue_rows(need, steps, i_tg * H + i_h, bos, o_r, m_r, H, BR)
        b_x = tl.load(x + (bos * H + i_h) * K + o_r[:, None] * (H * K) + o_k[None, :], mask=m_rk, other=0.)
        b_x = b_x / tl.where(m_nz, b_s, 1.)[:, None]
        b_x = tl.where(tl.abs(b_x) < float('inf'), b_x, 0.)
        b_x = tl.where(b_whole[:, None], b_b * b_dinv, b_x)
    else:
        m_redo = m_r
        b_x = b_b * b_dinv
    if ROUND_P:
        # any start will do: a rounded one makes r0 = b - A x0 a 5-product matvec too
        b_x = _round_hi(b_x, PREC)
    b_r = b_b - _chunk_mesa_matvec(b_x, b_k_hi, b_k_lo, b_m, b_e, b_lamb, b_h_hi, b_h_lo, p_ht, m_kk, PREC, K_IS_BF16,
                                      H_IN_LOOP, ROUND_P)
    if PRECONDITION == 2:
        b_z = _apply_factor(b_r, b_f_hi, b_f_lo, PREC, F_IS_BF16)
    elif PRECONDITION == 1:
        b_z = b_r * b_dinv
    else:
        b_z = b_r
    b_p = b_z
    b_rz = tl.sum(b_r * b_z, 1)
    # no absolute epsilon: a row is active while its relative residual is above tol (at least the residual floor,
    # relative too: `residual_floor2`) and rᵀz > 0
    m_act = m_nz & m_redo & (tl.sum(b_r * b_r, 1) > tol2) & (b_rz > 0)
    b_steps = tl.zeros([BR], dtype=tl.int32)

    i = tl.full([], 0, tl.int32)
    # a while loop: the tile stops as soon as no row is active
    while (i < max_steps) & (tl.max(m_act.to(tl.int32), 0) > 0):
        if ROUND_P:
            # x and r move along the rounded p itself, with w = A p exact to fp32: r stays b - A x, and α = rᵀp / pᵀAp
            # is the exact line search along p (rᵀz only equals rᵀp for unrounded directions)
            b_p = _round_hi(b_p, PREC)
        b_w = _chunk_mesa_matvec(b_p, b_k_hi, b_k_lo, b_m, b_e, b_lamb, b_h_hi, b_h_lo, p_ht, m_kk, PREC, K_IS_BF16,
                                 H_IN_LOOP, ROUND_P)
        if ROUND_P:
            b_pw, b_rp = sum2(b_p * b_w, b_r * b_p, 1)
        else:
            b_pw = tl.sum(b_p * b_w, 1)
            b_rp = b_rz
        # the curvature pᵀw must be positive: past convergence in fp32 it can underflow to 0 before rᵀz does, and a
        # row kept active with α = 0 would grow p = z + p without bound; it stops here, unchanged
        m_act = m_act & (b_pw > 0)
        b_alpha = tl.where(m_act, b_rp / tl.where(m_act, b_pw, 1.), 0.)
        b_x += b_alpha[:, None] * b_p
        b_r -= b_alpha[:, None] * b_w
        if PRECONDITION == 2:
            b_z = _apply_factor(b_r, b_f_hi, b_f_lo, PREC, F_IS_BF16)
        elif PRECONDITION == 1:
            b_z = b_r * b_dinv
        else:
            b_z = b_r
        b_rz_new, b_rr = sum2(b_r * b_z, b_r * b_r, 1)
        b_ratio = tl.where(m_act, b_rz_new / tl.where(m_act, b_rz, 1.), 0.)
        b_p = b_z + b_ratio[:, None] * b_p
        b_rz = tl.where(m_act, b_rz_new, b_rz)
        b_steps += m_act.to(tl.int32)
        # frozen rows stay frozen
        m_act = m_act & (b_rr > tol2) & (b_rz > 0)
        i += 1

    if RESCUE:
        # read again rather than kept through the loop, which is short of registers
        m_redo, b_prev, _ = _rescue_rows(need, steps, i_tg * H + i_h, bos, o_r, m_r, H, BR)
        b_steps += b_prev
    if FLAG_UNCONVERGED:
        # a row that stopped above tol (at max_steps or a breakdown), or with a NaN residual, stores ~steps
        m_bad = (b_s != 0) & ~(tl.sum(b_r * b_r, 1) <= tol2)
        b_steps = tl.where(m_bad, -1 - b_steps, b_steps)
        if FIRST:
            # precondition='auto', first pass: a row above tol marks its chunk and head for the second (1; the map
            # starts at 0, and every program of the chunk that marks writes the same 1). A plain store: an atomic
            # keeps each program waiting for its reply before it exits
            tl.store(need + i_tg * H + i_h, 1, mask=tl.max((m_bad & m_r).to(tl.int32), 0) > 0)
    b_x = b_x * b_s[:, None]
    # a rescue pass writes its own rows only
    m_w = m_r & m_redo
    tl.store(x + (bos * H + i_h) * K + o_r[:, None] * (H * K) + o_k[None, :], b_x, mask=m_w[:, None] & m_k[None, :])
    if XL:
        # x in bfloat16 as well (the adjoint solve's dq in q's dtype: no cast pass after the kernel)
        tl.store(xl + (bos * H + i_h) * K + o_r[:, None] * (H * K) + o_k[None, :], round_bf16(b_x),
                 mask=m_w[:, None] & m_k[None, :])
    tl.store(steps + (bos + o_r) * H + i_h, b_steps, mask=m_w)


@triton.jit
def _chunk_mesa_cg(
    b, k, g, beta, lamb, h_kk, factor, need, items, v, h_kv, do, x, xl, steps, cu_seqlens, chunk_indices,
    max_steps, tol2, T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, NR: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, PRECONDITION: tl.constexpr, ROUND_P: tl.constexpr,
    K_IS_BF16: tl.constexpr, V_IS_BF16: tl.constexpr, H_IN_LOOP: tl.constexpr, IS_VARLEN: tl.constexpr,
    RHS_DX: tl.constexpr, DO_IS_BF16: tl.constexpr, FLAG_UNCONVERGED: tl.constexpr, F_IS_BF16: tl.constexpr,
    RESCUE: tl.constexpr, FIRST: tl.constexpr, XL: tl.constexpr,
):
    # the forward (right-hand side b) and the backward's adjoint solve (b = dx formed from do) are two kernels over
    # this body, so that profiles and autotuning tell them apart
    if RESCUE:
        # precondition='auto', second pass: a few programs walk the `items` list (its count, then the chunks and heads
        # to solve, appended by the factor kernel or `rescue_items_kernel`), NR items a chunk; with nothing to rescue
        # they end at once, where a program per chunk would each start and return
        n_items = tl.load(items)
        for i_w in range(tl.program_id(0), n_items * NR, tl.num_programs(0)):
            i_c = tl.load(items + 1 + i_w // NR).to(tl.int64)
            i_tg, i_h = i_c // H, i_c % H
            if IS_VARLEN:
                i_t, i_b = i_tg, i_tg * 0
            else:
                i_t, i_b = i_tg % tl.cdiv(T, BT), i_tg // tl.cdiv(T, BT)
            _chunk_mesa_cg_item(
                i_t, i_w % NR, i_b, i_h, b, k, g, beta, lamb, h_kk, factor, need, v, h_kv, do, x, xl, steps,
                cu_seqlens, chunk_indices, max_steps, tol2, T, H, K, V, BT, NR, BK, BV, PREC, PRECONDITION, ROUND_P,
                K_IS_BF16, V_IS_BF16, H_IN_LOOP, IS_VARLEN, RHS_DX, DO_IS_BF16, FLAG_UNCONVERGED, F_IS_BF16, RESCUE,
                FIRST, XL,
            )
    else:
        i_tr, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        _chunk_mesa_cg_item(
            i_tr // NR, i_tr % NR, i_bh // H, i_bh % H, b, k, g, beta, lamb, h_kk, factor, need, v, h_kv, do, x, xl,
            steps, cu_seqlens, chunk_indices, max_steps, tol2, T, H, K, V, BT, NR, BK, BV, PREC, PRECONDITION, ROUND_P,
            K_IS_BF16, V_IS_BF16, H_IN_LOOP, IS_VARLEN, RHS_DX, DO_IS_BF16, FLAG_UNCONVERGED, F_IS_BF16, RESCUE, FIRST,
            XL,
        )


@triton.heuristics({
    'IS_VARLEN': lambda args: args['cu_seqlens'] is not None,
    'F_IS_BF16': lambda args: args['factor'] is not None and args['factor'].dtype == torch.bfloat16,
})
@triton.autotune(
    configs=_cg_configs(),
    key=CG_KEY,
    prune_configs_by={'early_config_prune': _prune_cg_configs},
    # the rescue pass of 'auto' updates x and steps in place: every config benchmarked starts from the same ones
    restore_value=['x', 'steps'],
    **autotune_cache_kwargs,
)
@triton.jit(do_not_specialize=['T', 'max_steps', 'tol2'])
def chunk_mesa_fwd_kernel_cg(
    b, k, g, beta, lamb, h_kk, factor, need, items, x, steps, cu_seqlens, chunk_indices, max_steps, tol2, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, NR: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    PRECONDITION: tl.constexpr, ROUND_P: tl.constexpr, K_IS_BF16: tl.constexpr, H_IN_LOOP: tl.constexpr,
    IS_VARLEN: tl.constexpr, FLAG_UNCONVERGED: tl.constexpr, F_IS_BF16: tl.constexpr, RESCUE: tl.constexpr,
    FIRST: tl.constexpr,
):
    # (H_t + Λ) x_t = b_t (the readout o_t = S_tᵀ x_t is `chunk_o`'s pass, after the solve)
    _chunk_mesa_cg(
        b, k, g, beta, lamb, h_kk, factor, need, items, None, None, None, x, None, steps, cu_seqlens, chunk_indices,
        max_steps, tol2, T, H, K, K, BT, NR, BK, BK, PREC, PRECONDITION, ROUND_P, K_IS_BF16, False, H_IN_LOOP,
        IS_VARLEN, False, False, FLAG_UNCONVERGED, F_IS_BF16, RESCUE, FIRST, False,
    )


@triton.heuristics({
    'IS_VARLEN': lambda args: args['cu_seqlens'] is not None,
    'DO_IS_BF16': lambda args: args['do'].dtype == torch.bfloat16,
    'XL': lambda args: args['xl'] is not None,
    'F_IS_BF16': lambda args: args['factor'] is not None and args['factor'].dtype == torch.bfloat16,
})
@triton.autotune(
    configs=_cg_configs(),
    # the adjoint's right-hand side takes V too
    key=CG_KEY + ['V'],
    prune_configs_by={'early_config_prune': _prune_cg_configs},
    # the rescue pass of 'auto' updates x and steps in place: every config benchmarked starts from the same ones
    restore_value=['x', 'steps'],
    **autotune_cache_kwargs,
)
@triton.jit(do_not_specialize=['T', 'max_steps', 'tol2'])
def chunk_mesa_bwd_kernel_cg(
    b, k, g, beta, lamb, h_kk, factor, need, items, v, h_kv, do, x, xl, steps, cu_seqlens, chunk_indices, max_steps, tol2,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, NR: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr, PRECONDITION: tl.constexpr, ROUND_P: tl.constexpr, K_IS_BF16: tl.constexpr,
    V_IS_BF16: tl.constexpr, H_IN_LOOP: tl.constexpr, IS_VARLEN: tl.constexpr, DO_IS_BF16: tl.constexpr,
    FLAG_UNCONVERGED: tl.constexpr, F_IS_BF16: tl.constexpr, RESCUE: tl.constexpr, FIRST: tl.constexpr,
    XL: tl.constexpr,
):
    # the adjoint solve (H_t + Λ) e_t = dx_t = S_t do_t; e goes to `x` (and in bfloat16 to `xl`, if given). The first
    # (or only) pass reads dx from `b`, which is `x` itself (each program reads its rows before it writes them); the
    # second pass of 'auto', where x holds the first pass's iterate, forms dx from do in the body
    _chunk_mesa_cg(
        b, k, g, beta, lamb, h_kk, factor, need, items, v, h_kv, do, x, xl, steps, cu_seqlens, chunk_indices,
        max_steps, tol2, T, H, K, V, BT, NR, BK, BV, PREC, PRECONDITION, ROUND_P, K_IS_BF16, V_IS_BF16, H_IN_LOOP,
        IS_VARLEN, RESCUE, DO_IS_BF16, FLAG_UNCONVERGED, F_IS_BF16, RESCUE, FIRST, XL,
    )


def chunk_mesa_cg(
    b: torch.Tensor | None,
    k: torch.Tensor,
    g_cum: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    h_kk: torch.Tensor,
    cg_max_steps: int,
    cg_tol: float | None,
    precondition: bool | str,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    chunk_size: int = 64,
    v: torch.Tensor | None = None,
    h_kv: torch.Tensor | None = None,
    precision: str | None = None,
    readout_precision: str | None = None,
    o_dtype: torch.dtype = torch.float32,
    do: torch.Tensor | None = None,
    round_directions: bool | None = None,
    flag_unconverged: bool = False,
    factor: torch.Tensor | None = None,
    skip_jacobi: torch.Tensor | None = None,
    return_rescued: bool = False,
    ht_kk: torch.Tensor | None = None,
    xl: torch.Tensor | None = None,
    _need: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    r"""
    Solves `(H_t + Λ) x_t = b_t` for every token and head by the project's CG (README "The solver"), one program per
    (rows of a chunk, head); with `v` and `h_kv` also returns the readout `o_t = S_tᵀ x_t` (`chunk_o.chunk_mesa_fwd_o`,
    a pass of its own after the solve).
    The backward's adjoint solve calls it with `do`, `v`, `h_kv` and no `b`: `b = dx = S_t do_t` comes from
    `chunk_o.chunk_mesa_bwd_dx`, in the buffer that then receives x (the second pass of 'auto' forms it in the
    kernel), and there is no readout.

    Args:
        b (torch.Tensor, Optional): right-hand sides `[B, T, H, K]` (q in the forward); `None` with `do`.
        k (torch.Tensor): keys `[B, T, H, K]`.
        g_cum (torch.Tensor): in-chunk cumulative log-decay in log2 space `[B, T, H]`, float32.
        beta (torch.Tensor): `[B, T, H]`.
        lamb (torch.Tensor): `[H, K]`, positive.
        h_kk (torch.Tensor): chunk-start states `[B, NT, H, K, K]` from `chunk_mesa_fwd_states`.
        cg_max_steps (int): at most this many iterations.
        cg_tol (float, Optional): relative residual tolerance; `None` runs every row for `cg_max_steps` (or to the
            residual floor, `residual_floor2`).
        precondition (bool or str): `True` Jacobi PCG, `False` plain CG, 'chunk' the chunk preconditioner
            (`precond.chunk_start_factor`, built here from `h_kk` unless `factor` is given), 'auto' Jacobi and then,
            for the rows it leaves above `cg_tol` only, the chunk preconditioner from Jacobi's iterate (the
            factor built for their chunks only; steps count both passes); chunks where `precond.jacobi_stall_score`
            predicts a Jacobi stall skip Jacobi (marked 2, as `skip_jacobi`). Without `cg_tol`, 'auto' is Jacobi.
        cu_seqlens, chunk_indices: varlen as in fla (`chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)`).
        chunk_size (int): 16, 32 or 64.
        v (torch.Tensor, Optional): values `[B, T, H, V]`, for the readout.
        h_kv (torch.Tensor, Optional): chunk-start states `[B, NT, H, K, V]`, for the readout.
        precision (str, Optional): operand precision of the CG loop's products (`DOT_PRECISIONS` or 'auto').
            Default: `CG_DOT_PRECISION` ('auto': tf32x3 for fp32 `k`, bf16x3 otherwise).
        readout_precision (str, Optional): operand precision of the readout's products. Default: `CG_DOT_PRECISION`.
        o_dtype (torch.dtype): dtype of `o` (the op's output dtype saves a cast pass). Default: float32.
        do (torch.Tensor, Optional): upstream gradient `[B, T, H, V]`: solve for `b_t = S_t do_t` (needs `v`, `h_kv`).
        round_directions (bool, Optional): round each CG direction to the split products' high part (bf16x3,
            tf32x3): 5 products a step instead of 7, the same attainable accuracy. Default: `CG_ROUND_DIRECTIONS`.
        flag_unconverged (bool): with `cg_tol`, a row that stops without reaching it stores `~steps` (= -steps - 1;
            `utils.split_cg_steps` decodes), as `solver.cg_solve`. Default: `False`.
        factor (torch.Tensor, Optional): with 'chunk', the factor `W` `[B, NT, H, K, K]` (float32 or bfloat16) of
            `M_c⁻¹ = W Wᵀ`. Default: built from `h_kk`, in `precond.FACTOR_DTYPE`.
        skip_jacobi (torch.Tensor, Optional): with 'auto', `[chunks, H]` (chunks in `h_kk`'s order): the chunks and
            heads, nonzero, whose rows skip the Jacobi pass and start the second one from the Jacobi start (the
            backward passes the forward's rescued chunks: the adjoint solve has the same matrices).
        ht_kk (torch.Tensor, Optional): the final states `[N, H, K, K]` of `chunk_mesa_fwd_states`, for 'chunk' and
            'auto' (`M_c` reads each chunk's end state, the final one at a sequence's last chunk).
        xl (torch.Tensor, Optional): a bfloat16 `[B, T, H, K]` tensor that receives x too, rounded to bfloat16 (the
            backward's dq in q's dtype, with no cast pass after the kernel). Only with `do`.
        return_rescued (bool): also return the `[chunks, H]` int32 map of the chunks the second pass of 'auto'
            solved (`None` without one): 1 rescued after Jacobi, 2 Jacobi skipped (`skip_jacobi` or predicted).

    Returns:
        x (torch.Tensor): `[B, T, H, K]` float32.
        steps (torch.Tensor): `[B, T, H]` int32, the iterations each row ran.
        o (torch.Tensor): `[B, T, H, V]` in `o_dtype`, or `None` without `v`/`h_kv`.
        rescued (torch.Tensor, Optional): with `return_rescued`, the map above.
    """
    B, T, H, K = k.shape
    if (b is None) == (do is None):
        raise ValueError("give exactly one of `b` and `do` (the right-hand side, or the gradient that forms it)")
    if do is not None and v is None:
        raise ValueError("`do` needs `v` and `h_kv` (b = dx = S_t do_t)")
    if not is_precondition(precondition):
        raise ValueError(f"`precondition` must be True (Jacobi), False, 'chunk' or 'auto', got {precondition!r}")
    precision = resolve_precision(precision, CG_DOT_PRECISION, k)
    readout_precision = resolve_precision(readout_precision, CG_DOT_PRECISION, k, 'readout_precision')
    if K > 256 or (K > 128 and k.is_cuda):
        # above K = 128 the K x K tile and its split overflow a Hopper SM's shared memory
        limit = 128 if k.is_cuda else 256
        raise ValueError(f"the Triton chunk CG supports head dims K <= {limit} on {k.device.type}, got K = {K} "
                         "(chunk_mesa runs the PyTorch path above 128 on a GPU)")
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"`chunk_size` must be 16, 32 or 64, got {chunk_size!r}")
    if (v is None) != (h_kv is None):
        raise ValueError("`v` and `h_kv` must be given together (the readout needs both)")
    if xl is not None and (do is None or xl.dtype != torch.bfloat16 or xl.shape != k.shape or not xl.is_contiguous()):
        raise ValueError(f"`xl` must be a contiguous bfloat16 tensor of k's shape {tuple(k.shape)}, given with `do`, "
                         f"got {xl.dtype} {tuple(xl.shape)}")
    BT = chunk_size
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, BT)
    NT = triton.cdiv(T, BT) if cu_seqlens is None else len(chunk_indices)
    BK = max(triton.next_power_of_2(K), 16)
    k, g_cum, beta, lamb, h_kk = (t.contiguous() for t in (k, g_cum, beta, lamb, h_kk))
    b, do, v, h_kv = (None if t is None else t.contiguous() for t in (b, do, v, h_kv))
    rescue = precondition == 'auto' and cg_tol is not None and cg_max_steps > 0
    if skip_jacobi is not None and not rescue:
        raise ValueError("`skip_jacobi` is for precondition='auto' with cg_tol and cg_max_steps > 0")
    if precondition == 'auto' and not rescue:
        precondition = True
    # `_need`: given when 'auto' calls this for its first pass, the map that pass reads (2: skip) and marks (1);
    # `listed`: whether the factor kernel wrote the second pass's work list
    need, listed = _need, False
    if precondition in ('chunk', 'auto') and (factor is None or rescue):
        # M_c = (H_c + H_{c+1}) / 2 + Λ, for the factor and the stall score: the state after each chunk too
        if ht_kk is None:
            raise ValueError(f"precondition={precondition!r} needs `ht_kk`, the final states (M_c takes each "
                             "sequence's last chunk's end state from them)")
        ht_kk = ht_kk.contiguous()
    if rescue:
        # the map, `[chunks, H]` in h_kk's order: 2 where the rows skip the Jacobi pass (`skip_jacobi`, or where
        # `chunk_stall_kernel` predicts a stall), else 0, which the Jacobi pass sets to 1 where a row stops above tol;
        # then the second pass's work list (its count, then the chunks and heads), built on the device by the factor
        # kernel, which visits the same chunks, else by `rescue_items_kernel`. One zeroed buffer, no host sync
        n = h_kk.shape[0] * h_kk.shape[1] * H
        buf = torch.zeros(2 * n + 1, dtype=torch.int32, device=k.device)
        need, items = buf[:n].view(-1, H), buf[n:]
        if skip_jacobi is None:
            chunk_stall_kernel[(need.shape[0], H)](
                h_kk, ht_kk, g_cum, lamb, need, cu_seqlens, chunk_indices, T, h_kk.shape[1], H=H, K=K, BK=BK,
                BR=min(BK, 16), BT=BT, STALL_FF2=float(JACOBI_STALL_FF2), IS_VARLEN=cu_seqlens is not None, num_warps=4)
        else:
            # the backward: the forward's map, its predicted stalls included (the same matrices, the same scores)
            need.masked_fill_(skip_jacobi.reshape(-1, H) != 0, 2)
        # (no readout: it follows the second pass)
        x, steps, _ = chunk_mesa_cg(
            b, k, g_cum, beta, lamb, h_kk, cg_max_steps, cg_tol, True, cu_seqlens, chunk_indices, chunk_size,
            *((v, h_kv) if do is not None else (None, None)), precision, do=do, round_directions=round_directions,
            flag_unconverged=True, xl=xl, _need=need,
        )
    if precondition in ('chunk', 'auto') and factor is None:
        # the Triton factorisation where it fits (K <= 128); rounding in W changes step counts only (op README)
        seq_chunks = chunk_indices if cu_seqlens is not None else None
        if K <= 128:
            factor = chunk_start_factor_triton(h_kk, 0.5, lamb, FACTOR_DTYPE, need=need, ht_kk=ht_kk,
                                               chunk_indices=seq_chunks, items=items if rescue else None)
            listed = rescue
        else:
            h_sum = h_kk + chunk_end_states(h_kk, ht_kk, seq_chunks)
            factor = chunk_start_factor(h_sum, h_kk.new_full(h_kk.shape[:3], 0.5), lamb, FACTOR_DTYPE)
    if rescue and not listed:
        rescue_items_kernel[(triton.cdiv(need.numel(), 1024),)](need, items, need.numel(), BLOCK=1024)
    if precondition in ('chunk', 'auto'):
        if factor.shape != h_kk.shape or factor.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"`factor` must be float32 or bfloat16 of h_kk's shape {tuple(h_kk.shape)}, got "
                             f"{factor.dtype} {tuple(factor.shape)}")
        factor = factor.contiguous()
    else:
        factor = None

    if not rescue:
        if do is None:
            x = k.new_empty(B, T, H, K, dtype=torch.float32)
        else:
            # the adjoint's right-hand side by the output pass (many small programs a multiprocessor), written where
            # e goes: the CG kernel (one program a multiprocessor) keeps its registers for the solve, no memory added
            x = chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, cu_seqlens, chunk_indices, chunk_size, precision)
        steps = k.new_empty(B, T, H, dtype=torch.int32)
    tol2 = max(0.0 if cg_tol is None else float(cg_tol) ** 2, residual_floor2(torch.float32, precision))
    # the first pass of 'auto' (the call that the rescue branch above makes)
    first = need is not None and not rescue

    def grid(meta):
        if rescue:
            return (min(NT * meta['NR'] * B * H, _rescue_programs(k.device.index)), 1)
        return (NT * meta['NR'], B * H)

    kw = dict(
        k=k, g=g_cum, beta=beta, lamb=lamb, h_kk=h_kk, factor=factor, need=need, items=items if rescue else None,
        x=x, steps=steps, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, max_steps=int(cg_max_steps),
        tol2=tol2, T=T, H=H, K=K, BT=BT, BK=BK, PREC=precision,
        PRECONDITION=2 if factor is not None else int(bool(precondition)),
        ROUND_P=precision in ('bf16x3', 'tf32x3') and (CG_ROUND_DIRECTIONS if round_directions is None else round_directions),
        K_IS_BF16=k.dtype == torch.bfloat16,
        H_IN_LOOP=BK > 128,
        FLAG_UNCONVERGED=bool(flag_unconverged) and cg_tol is not None,
        RESCUE=rescue,
        FIRST=first,
    )
    o = None
    if do is None:
        chunk_mesa_fwd_kernel_cg[grid](b=b, **kw)
        if v is not None:
            o = chunk_mesa_fwd_o(x, k, v, g_cum, beta, h_kv, cu_seqlens, chunk_indices, chunk_size, readout_precision,
                                 o_dtype)
    else:
        V = v.shape[-1]
        chunk_mesa_bwd_kernel_cg[grid](b=x, do=do, xl=xl, v=v, h_kv=h_kv, V=V, BV=min(max(triton.next_power_of_2(V), 16), 64),
                                       V_IS_BF16=v.dtype == torch.bfloat16, **kw)
    if return_rescued:
        return x, steps, o, need if rescue else None
    return x, steps, o
