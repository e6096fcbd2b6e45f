# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""Fused-recurrent Mesa for inference: one Triton program per (sequence, head) walks the tokens in order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.utils import autotune_cache_kwargs, input_guard

from fla_mesa.ops.mesa.kernel_utils import round_code, round_to, sum2
from fla_mesa.ops.mesa.recurrent_torch import recurrent_mesa_torch
from fla_mesa.ops.mesa.utils import (
    check_inputs, compute_dtype, flags_unconverged, l2norm, op_outputs, residual_floor2, use_triton,
)
from fla_mesa.utils import is_interpreting

# H [K, K] stays in registers up to this padded K; larger heads stream H through the final-state buffer (L2)
MAX_BK_IN_REGS = 128
# one program per (sequence, head) holds all of H: more warps spread its registers thinner (K = 128: 64 KB of
# fp32 H over 4 warps is 128 registers a thread), fewer keep more programs resident; the autotuner picks
# (benchmarks/results/decode_h200.md lists its timings)
NUM_WARPS = [2, 4, 8, 16]
# no fused multiply-adds in this kernel. Each warp holds its own copy of the CG vectors and decides alone when to
# leave the loop, which is sound only if the copies agree to the bit. With fusion the sm_90 code of a cross-lane sum
# adds a lane's own product unrounded to its partner's rounded one (`mul`, `shfl`, `fma`), so lanes, and then the
# warps' copies, drift apart; a warp that leaves the loop while another waits at the loop's barrier hangs the
# program (benchmarks/results/gpu_tests_h200.md §5-6); `benchmarks/tools/probe_recurrent.py` runs those cases with
# this on and off
FP_FUSION = False


def _configs():
    if is_interpreting():
        # autotuning needs a GPU driver
        return [triton.Config({'BV': 32}, num_warps=4)]
    return [triton.Config({'BV': 32}, num_warps=num_warps) for num_warps in NUM_WARPS]


def _prune_configs(configs, named_args, **kwargs):
    # H in registers takes BK² / (32 · num_warps) registers a thread: 2 warps cannot hold a 128² H, and small
    # heads do not need 16 warps
    BK = kwargs.get('BK', named_args.get('BK'))
    keep = [c for c in configs if BK * BK // (32 * c.num_warps) <= 128 and (BK > 32 or c.num_warps <= 4)]
    return keep or configs[:1]


@triton.jit
def _prev_state(state, init, offsets, mask, i_t, USE_INITIAL_STATE: tl.constexpr, DTYPE: tl.constexpr):
    # a block of the state before token i_t: the initial state (or zeros) at the first token, else where the
    # previous token stored it (`init` is None without an initial state)
    b = tl.load(state + offsets, mask=mask & (i_t > 0), other=0).to(DTYPE)
    if USE_INITIAL_STATE:
        b += tl.load(init + offsets, mask=mask & (i_t == 0), other=0).to(DTYPE)
    return b


@triton.jit
def _l2norm(b_x, ROUND: tl.constexpr):
    # fla's L2Norm, as `qk_l2norm` applies it on the chunk path: x / sqrt(Σx² + 1e-6) in float32, stored in x's
    # dtype; and the reciprocal norm
    b_r = 1 / tl.sqrt(tl.sum(b_x * b_x) + 1e-6)
    return round_to(b_x * b_r, ROUND), b_r


@triton.jit
def _matvec(b_h, ht_kk, i_nh, b_p, b_lamb, o_k, m_k, K: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
            H_IN_REGS: tl.constexpr, DTYPE: tl.constexpr):
    """`A p = H p + λ ⊙ p`."""
    if H_IN_REGS:
        # Hᵀ p, which is H p: H is symmetric (every update is, and so is a state this op or chunk_mesa wrote).
        # a coalesced load puts the lanes along H's rows, so the sum over the row index is in-thread adds and one
        # cross-warp step, where the sum over the column index would be five shuffles for every entry
        b_w = tl.sum(b_h * b_p[:, None], axis=0)
    else:
        b_w = tl.zeros([BK], dtype=DTYPE)
        for i_c in range(0, tl.cdiv(K, BC)):
            o_c = i_c * BC + tl.arange(0, BC)
            m_c = o_c < K
            # [BC, BK], b_t[c, i] = H[i, c]
            b_t = tl.load(ht_kk + i_nh * K * K + o_k[None, :] * K + o_c[:, None], mask=m_c[:, None] & m_k[None, :], other=0)
            # the entries of p in this column block, picked out of the register vector
            b_pc = tl.sum(tl.where(o_k[None, :] == o_c[:, None], b_p[None, :], 0), axis=1)
            b_w += tl.sum(b_t * b_pc[:, None], axis=0)
    return b_w + b_lamb * b_p


@triton.heuristics({
    'USE_INITIAL_STATE': lambda args: args['h0_kk'] is not None,
    'STORE_CG_STEPS': lambda args: args['cg_steps'] is not None,
    'IS_VARLEN': lambda args: args['cu_seqlens'] is not None,
})
@triton.autotune(
    configs=_configs(),
    # NH: the number of programs, bucketed; few programs want more warps each, many want fewer. DTYPE follows q's
    # dtype, which (as every tensor's) the autotuner adds to the key itself; a tl.dtype in the key would break
    # TRITON_CACHE_AUTOTUNING (not JSON-serialisable)
    key=['NH', 'H', 'K', 'V', 'BK', 'H_IN_REGS', 'SOLVE', 'PRECONDITION', 'QK_L2NORM'],
    prune_configs_by={'early_config_prune': _prune_configs},
    **autotune_cache_kwargs,
)
@triton.jit(do_not_specialize=['T', 'max_steps', 'NH'])
def fused_recurrent_mesa_fwd_kernel(
    q,
    k,
    v,
    g,
    beta,
    lamb,
    o,
    h0_kk,
    h0_kv,
    ht_kk,
    ht_kv,
    cg_steps,
    cu_seqlens,
    tol,
    max_steps,
    T,
    NH,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    H_IN_REGS: tl.constexpr,
    SOLVE: tl.constexpr,
    PRECONDITION: tl.constexpr,
    DTYPE: tl.constexpr,
    FLOOR2: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_CG_STEPS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    FLAG_UNCONVERGED: tl.constexpr,
    QK_L2NORM: tl.constexpr,
    Q_ROUND: tl.constexpr,
    K_ROUND: tl.constexpr,
):
    i_nh = tl.program_id(0).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = eos - bos
    else:
        bos = i_n * T

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_lamb = tl.load(lamb + i_h * K + o_k, mask=m_k, other=0).to(DTYPE)
    # tol², at least the residual floor, squared here: a float argument reaches the kernel as fp32, where float64's
    # floor (1.5e-154) would be 0; the constexpr floor is kept in DTYPE
    b_tol = tl.cast(tol, DTYPE)
    b_tol2 = tl.maximum(b_tol * b_tol, FLOOR2)

    # diag(H) is carried as a vector: the Jacobi start and preconditioner need it, and it updates like H
    if USE_INITIAL_STATE:
        b_dh = tl.load(h0_kk + i_nh * K * K + o_k * (K + 1), mask=m_k, other=0).to(DTYPE)
    else:
        b_dh = tl.zeros([BK], dtype=DTYPE)
    if H_IN_REGS:
        # [BK, BK]
        if USE_INITIAL_STATE:
            p_h0 = h0_kk + i_nh * K * K + o_k[:, None] * K + o_k[None, :]
            if K == BK:
                b_h = tl.load(p_h0).to(DTYPE)
            else:
                b_h = tl.load(p_h0, mask=m_k[:, None] & m_k[None, :], other=0).to(DTYPE)
        else:
            b_h = tl.zeros([BK, BK], dtype=DTYPE)
    else:
        b_h = tl.zeros([1, 1], dtype=DTYPE)

    for i_t in range(0, T):
        # offsets from scalars each token: loop-carried pointer vectors would be kept in every layout the
        # compiler loads k in (a [BK] vector replicated over a warp's rows costs BK 64-bit pointers)
        i_tok = bos + tl.cast(i_t, tl.int64)
        b_q = tl.load(q + (i_tok * H + i_h) * K + o_k, mask=m_k, other=0).to(DTYPE)
        b_k = tl.load(k + (i_tok * H + i_h) * K + o_k, mask=m_k, other=0).to(DTYPE)
        if QK_L2NORM:
            # in the kernel: two launches of fla's L2Norm less a decode step and layer
            b_q, _ = _l2norm(b_q, Q_ROUND)
            b_k, b_rk = _l2norm(b_k, K_ROUND)
        b_gamma = tl.exp(tl.load(g + i_tok * H + i_h).to(DTYPE))
        b_beta = tl.load(beta + i_tok * H + i_h).to(DTYPE)
        b_kb = b_k * b_beta

        # H_t = γ H_{t-1} + β k kᵀ
        b_dh = b_dh * b_gamma + b_kb * b_k
        if H_IN_REGS:
            b_h = b_h * b_gamma + b_kb[:, None] * b_k[None, :]
        else:
            # H lives in ht_kk; every thread must be done reading the previous token's H
            tl.debug_barrier()
            for i_c in range(0, tl.cdiv(K, BC)):
                o_c = i_c * BC + tl.arange(0, BC)
                m_c = o_c < K
                m_ck = m_c[:, None] & m_k[None, :]
                o_ck = i_nh * K * K + o_c[:, None] * K + o_k[None, :]
                p_ht = ht_kk + o_ck
                b_hc = _prev_state(ht_kk, h0_kk, o_ck, m_ck, i_t, USE_INITIAL_STATE, DTYPE)
                b_kc = tl.load(k + (i_tok * H + i_h) * K + o_c, mask=m_c, other=0).to(DTYPE)
                if QK_L2NORM:
                    b_kc = round_to(b_kc * b_rk, K_ROUND)
                b_hc = b_hc * b_gamma + (b_kc * b_beta)[:, None] * b_k[None, :]
                tl.store(p_ht, b_hc.to(p_ht.dtype.element_ty), mask=m_ck)
            # the solve reads H in another layout
            tl.debug_barrier()

        # x_t = (H_t + Λ)⁻¹ q_t by the project's CG (README, "The solver")
        i_s = tl.zeros([], dtype=tl.int32)
        if SOLVE:
            b_s = tl.sqrt(tl.sum(b_q * b_q))
            b_b = b_q / tl.where(b_s > 0, b_s, 1)
            b_d = b_dh + b_lamb
            # padded lanes: d = 1 keeps them at exactly zero
            b_d = tl.where(m_k, b_d, 1)
            # the reciprocal once: a multiply per step instead of a division (as the reference solver does)
            b_dinv = 1 / b_d
            b_x = b_b * b_dinv
            b_r = b_b - _matvec(b_h, ht_kk, i_nh, b_x, b_lamb, o_k, m_k, K, BK, BC, H_IN_REGS, DTYPE)
            if PRECONDITION:
                b_z = b_r * b_dinv
            else:
                b_z = b_r
            b_p = b_z
            b_rz = tl.sum(b_r * b_z)
            b_active = (b_s > 0) & (tl.sum(b_r * b_r) > b_tol2) & (b_rz > 0)
            while (i_s < max_steps) & b_active:
                b_w = _matvec(b_h, ht_kk, i_nh, b_p, b_lamb, o_k, m_k, K, BK, BC, H_IN_REGS, DTYPE)
                b_pw = tl.sum(b_p * b_w)
                # exact zeros are the only guard: no absolute epsilon. A curvature pᵀw <= 0 (an underflow past
                # convergence) stops the row here, unchanged and not counted
                b_active = b_pw > 0
                b_alpha = tl.where(b_active, b_rz / tl.where(b_active, b_pw, 1), 0)
                b_x += b_alpha * b_p
                b_r -= b_alpha * b_w
                if PRECONDITION:
                    b_z = b_r * b_dinv
                    # both sums in one reduction: one cross-warp exchange instead of two
                    b_rz_new, b_rr = sum2(b_r * b_z, b_r * b_r, 0)
                else:
                    b_z = b_r
                    b_rz_new = tl.sum(b_r * b_z)
                    b_rr = b_rz_new
                b_p = b_z + (b_rz_new / b_rz) * b_p
                b_rz = b_rz_new
                i_s += b_active.to(tl.int32)
                # rᵀz can underflow to 0 before rᵀr does: stop there too, before 0/0 reaches p
                b_active = b_active & (b_rr > b_tol2) & (b_rz > 0)
            if FLAG_UNCONVERGED:
                # stopped above tol (at max_steps or a breakdown), or a NaN residual: ~steps (`split_cg_steps`)
                i_s = tl.where((b_s != 0) & ~(tl.sum(b_r * b_r) <= b_tol2), -1 - i_s, i_s)
            b_x = b_x * b_s
        else:
            # cg_max_steps = 0: no solve, x = q (gated linear attention)
            b_x = b_q
        if STORE_CG_STEPS:
            tl.store(cg_steps + i_tok * H + i_h, i_s)

        # S_t = γ S_{t-1} + β k vᵀ and o_t = S_tᵀ x_t, V in blocks; S goes through ht_kv, whose block each
        # thread reads back from where it wrote it the token before (same pointers, same layout)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_kv = m_k[:, None] & m_v[None, :]
            o_kv = i_nh * K * V + o_k[:, None] * V + o_v[None, :]
            p_st = ht_kv + o_kv
            b_sv = _prev_state(ht_kv, h0_kv, o_kv, m_kv, i_t, USE_INITIAL_STATE, DTYPE)
            b_v = tl.load(v + (i_tok * H + i_h) * V + o_v, mask=m_v, other=0).to(DTYPE)
            b_sv = b_sv * b_gamma + b_kb[:, None] * b_v[None, :]
            tl.store(p_st, b_sv.to(p_st.dtype.element_ty), mask=m_kv)
            b_o = tl.sum(b_sv * b_x[:, None], axis=0)
            tl.store(o + (i_tok * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

    if H_IN_REGS:
        p_ht = ht_kk + i_nh * K * K + o_k[:, None] * K + o_k[None, :]
        if K == BK:
            tl.store(p_ht, b_h.to(ht_kk.dtype.element_ty))
        else:
            tl.store(p_ht, b_h.to(ht_kk.dtype.element_ty), mask=m_k[:, None] & m_k[None, :])
    if T == 0:
        # an empty sequence of a varlen batch: its final state is its initial state
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_kv = m_k[:, None] & (o_v < V)[None, :]
            b_sv = tl.zeros([BK, BV], dtype=DTYPE)
            if USE_INITIAL_STATE:
                b_sv += tl.load(h0_kv + i_nh * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0).to(DTYPE)
            tl.store(ht_kv + i_nh * K * V + o_k[:, None] * V + o_v[None, :], b_sv.to(ht_kv.dtype.element_ty), mask=m_kv)
        if not H_IN_REGS:
            for i_c in range(0, tl.cdiv(K, BC)):
                o_c = i_c * BC + tl.arange(0, BC)
                m_ck = (o_c < K)[:, None] & m_k[None, :]
                b_hc = tl.zeros([BC, BK], dtype=DTYPE)
                if USE_INITIAL_STATE:
                    b_hc += tl.load(h0_kk + i_nh * K * K + o_c[:, None] * K + o_k[None, :], mask=m_ck, other=0).to(DTYPE)
                tl.store(ht_kk + i_nh * K * K + o_c[:, None] * K + o_k[None, :], b_hc.to(ht_kk.dtype.element_ty), mask=m_ck)


def fused_recurrent_mesa_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    cg_max_steps: int = 30,
    cg_tol: float | None = 1e-4,
    precondition: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
    return_cg_steps: bool = True,
    flag_unconverged: bool = False,
    qk_l2norm: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """
    Launches the kernel on contiguous, validated inputs (no checks here: the decode loop calls this directly);
    `qk_l2norm`: q and k L2-normalised in the kernel, as fla's `L2Norm` would (not for float64 inputs).
    Returns `o [B, T, H, V]` (v's dtype), the final state `(h_kk, h_kv)` and `cg_steps [B, T, H]` or `None`; with
    `flag_unconverged` (and `cg_tol`), a token that did not reach `cg_tol` has `~n` steps (`split_cg_steps`).
    """
    B, T, H, K, V = *k.shape, v.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    dtype = compute_dtype(q)
    BK = max(triton.next_power_of_2(K), 16)
    if BK > 256:
        raise ValueError(f"fused_recurrent_mesa supports head dims K <= 256, got K = {K}")
    # float64 (tests, references) holds half as many entries in the same registers
    h_in_regs = BK <= (MAX_BK_IN_REGS // 2 if dtype == torch.float64 else MAX_BK_IN_REGS)

    o = torch.empty_like(v)
    ht_kk = q.new_empty(N, H, K, K, dtype=dtype)
    ht_kv = q.new_empty(N, H, K, V, dtype=dtype)
    cg_steps = q.new_empty(B, T, H, dtype=torch.int32) if return_cg_steps else None
    h0_kk, h0_kv = (None, None) if initial_state is None else initial_state
    fused_recurrent_mesa_fwd_kernel[(N * H,)](
        q=q,
        k=k,
        v=v,
        g=g,
        beta=beta,
        lamb=lamb,
        o=o,
        h0_kk=h0_kk,
        h0_kv=h0_kv,
        ht_kk=ht_kk,
        ht_kv=ht_kv,
        cg_steps=cg_steps,
        cu_seqlens=cu_seqlens,
        tol=0.0 if cg_tol is None else float(cg_tol),
        max_steps=cg_max_steps,
        T=T,
        NH=min(triton.next_power_of_2(N * H), 4096),
        H=H,
        K=K,
        V=V,
        BK=BK,
        BC=16 if dtype == torch.float64 else 32,
        H_IN_REGS=h_in_regs,
        SOLVE=cg_max_steps > 0,
        PRECONDITION=precondition,
        DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
        FLOOR2=residual_floor2(dtype),
        FLAG_UNCONVERGED=flag_unconverged and cg_tol is not None and return_cg_steps,
        QK_L2NORM=qk_l2norm,
        Q_ROUND=round_code(q.dtype),
        K_ROUND=round_code(k.dtype),
        enable_fp_fusion=FP_FUSION,
    )
    return o, (ht_kk, ht_kv), cg_steps


@input_guard
def _forward(
    q, k, v, g, beta, lamb, h0_kk, h0_kv, cg_max_steps, cg_tol, precondition, cu_seqlens, flag_unconverged, qk_l2norm
):
    initial_state = None if h0_kk is None else (h0_kk, h0_kv)
    if use_triton(q):
        o, (ht_kk, ht_kv), steps = fused_recurrent_mesa_fwd(
            q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens,
            flag_unconverged=flag_unconverged, qk_l2norm=qk_l2norm,
        )
    else:
        o, (ht_kk, ht_kv), steps = recurrent_mesa_torch(
            q, k, v, g, beta, lamb, initial_state, output_final_state=True, cg_max_steps=cg_max_steps,
            cg_tol=cg_tol, precondition=precondition, cu_seqlens=cu_seqlens, return_cg_steps=True,
            flag_unconverged=flag_unconverged,
        )
    return o, ht_kk, ht_kv, steps


class FusedRecurrentMesaFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, *args):
        o, ht_kk, ht_kv, steps = _forward(*args)
        ctx.mark_non_differentiable(steps)
        return o, ht_kk, ht_kv, steps

    @staticmethod
    def backward(ctx, do, dht_kk, dht_kv, dsteps):
        raise NotImplementedError(
            "fused_recurrent_mesa is for inference only and has no backward; train with `chunk_mesa`."
        )


@torch.compiler.disable
def fused_recurrent_mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cg_max_steps: int = 30,
    cg_tol: float | None = 1e-4,
    precondition: bool = True,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    return_cg_steps: bool | str = False,
    check_values: bool = True,
    return_cg_unconverged: bool = False,
    warn_unconverged: bool = False,
):
    r"""
    The Mesa layer token by token, for inference: decoding one or several tokens per call, short prefills and
    speculative verification. Each (sequence, head) walks its tokens in order with `H` and `S` kept in float32 and
    solves every token with the same CG as `chunk_mesa` (same start, preconditioner, stopping rule and step counts).
    Has no backward (train with `chunk_mesa`).

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`; `V` may differ from `K`.
        g (torch.Tensor):
            log-decays `log γ_t <= 0` of shape `[B, T, H]`.
        beta (torch.Tensor):
            write strengths of shape `[B, T, H]`.
        lamb (torch.Tensor):
            the ridge `Λ`, positive, of shape `[H, K]`.
        initial_state (Tuple[torch.Tensor, torch.Tensor], Optional):
            `(h_kk [N, H, K, K], h_kv [N, H, K, V])` in float32, `N` the batch size, or the number of sequences
            when `cu_seqlens` is given. `h_kk` must be symmetric, as every state of this op and of `chunk_mesa`
            is (for K <= 128 the kernel multiplies by its transpose, which reads H faster). Default: `None` (zeros).
        output_final_state (bool, Optional):
            whether to return the final state, in the layout of `initial_state`. Default: `False`.
        cg_max_steps (int, Optional):
            at most this many CG iterations per token; `0` skips the solve (`q* = q`). Default: `30`.
        cg_tol (float, Optional):
            a token stops once its relative residual is at most `cg_tol`; `None` runs every token for
            `cg_max_steps`, unless its residual falls below 9e-10 (float32; 2e-18 in float64; `utils.residual_floor2`).
            Default: `1e-4`.
        precondition (bool, Optional):
            Jacobi-preconditioned CG; `False` plain CG. `'chunk'` is refused: the chunk-start
            preconditioner is `chunk_mesa`'s (op README). Default: `True`.
        cu_seqlens (torch.LongTensor, Optional):
            cumulative sequence lengths `[N + 1]` of packed sequences (then `B` must be 1). Default: `None`.
        use_qk_l2norm_in_kernel (bool, Optional):
            L2-normalise q and k inside the op. Default: `False`.
        return_cg_steps (bool or str, Optional):
            also return the CG iterations of every token, `[B, T, H]` int32; `'encoded'`: with the tokens that
            stopped without reaching `cg_tol` as `~n` (= -n - 1) for their `n` steps, in the same tensor
            (`utils.split_cg_steps` decodes; no extra ops, what `MesaNet` keeps). Default: `False`.
        check_values (bool, Optional):
            check that `lamb > 0`, `g <= 0` (`-inf` allowed: γ = 0) and `beta >= 0` everywhere and that every input
            is finite (a `ValueError` otherwise), at the price of one host sync per call. `MesaNet`, whose inputs
            are valid by construction, turns it off. Default: `True`.
        return_cg_unconverged (bool, Optional):
            also return a bool `[B, T, H]` marking the tokens that stopped without reaching `cg_tol` (at
            `cg_max_steps`, or at a breakdown), whose outputs may be far off; no host sync. All `False` with
            `cg_tol=None`. Default: `False`.
        warn_unconverged (bool, Optional):
            warn (`RuntimeWarning`, one host sync) when any token stopped without reaching `cg_tol`. Default: `False`.

    Returns:
        o (torch.Tensor): `[B, T, H, V]`, in the dtype of `v`.
        final_state (Tuple[torch.Tensor, torch.Tensor]): the final state if `output_final_state`, else `None`.
        cg_steps (torch.Tensor): `[B, T, H]`, only if `return_cg_steps` (encoded if `'encoded'`).
        cg_unconverged (torch.Tensor): `[B, T, H]` bool, only if `return_cg_unconverged`.

    Examples::
        >>> import torch, torch.nn.functional as F
        >>> from fla_mesa.ops.mesa import chunk_mesa, fused_recurrent_mesa
        >>> B, T, H, K, V = 2, 100, 4, 64, 32
        >>> q, k = torch.randn(B, T + 1, H, K, device='cuda'), torch.randn(B, T + 1, H, K, device='cuda')
        >>> v = torch.randn(B, T + 1, H, V, device='cuda')
        >>> g = F.logsigmoid(torch.randn(B, T + 1, H, device='cuda') + 4)
        >>> beta = torch.rand(B, T + 1, H, device='cuda')
        >>> lamb = torch.ones(H, K, device='cuda')
        # prefill with the chunk kernels, then decode one token from the state
        >>> _, state = chunk_mesa(q[:, :T], k[:, :T], v[:, :T], g[:, :T], beta[:, :T], lamb,
        ...                       output_final_state=True, use_qk_l2norm_in_kernel=True)
        >>> o, state = fused_recurrent_mesa(q[:, T:], k[:, T:], v[:, T:], g[:, T:], beta[:, T:], lamb,
        ...                                 initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    """
    check_inputs(q, k, v, g, beta, lamb, initial_state, cu_seqlens, cg_max_steps, cg_tol, check_values=check_values)
    if not isinstance(precondition, bool):
        # 'chunk' has no token-by-token form that pays: a factorisation per token costs more than the CG steps it
        # saves (op README, "Chunk preconditioner")
        raise ValueError(f"fused_recurrent_mesa takes `precondition` True (Jacobi) or False, got {precondition!r}; "
                         "the chunk preconditioner ('chunk') is chunk_mesa's only (op README)")
    # q and k normalised in the kernel on the Triton path (as fla's L2Norm would: the chunk path's norm), in the
    # solver's dtype by PyTorch elsewhere and for float64
    in_kernel = use_qk_l2norm_in_kernel and use_triton(q) and q.dtype != torch.float64 and k.dtype != torch.float64
    if use_qk_l2norm_in_kernel and not in_kernel:
        q, k = l2norm(q.to(compute_dtype(q))), l2norm(k.to(compute_dtype(k)))
    h0_kk, h0_kv = (None, None) if initial_state is None else initial_state
    flag = flags_unconverged(return_cg_steps, return_cg_unconverged, warn_unconverged, cg_max_steps, cg_tol)
    args = (q, k, v, g, beta, lamb, h0_kk, h0_kv, cg_max_steps, cg_tol, precondition, cu_seqlens, flag, in_kernel)
    # the autograd node (whose backward raises) only where a gradient could be asked for: decoding skips its cost
    tracked = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in args)
    o, ht_kk, ht_kv, steps = FusedRecurrentMesaFunction.apply(*args) if tracked else _forward(*args)
    final_state = (ht_kk, ht_kv) if output_final_state else None
    return op_outputs('fused_recurrent_mesa', o, final_state, steps, flag, cg_max_steps, cg_tol, return_cg_steps,
                      return_cg_unconverged, warn_unconverged)
