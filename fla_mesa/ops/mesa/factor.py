# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The chunk-start factor `W = L⁻ᵀ` (`L Lᵀ = M = a H + Λ`, `M⁻¹ = W Wᵀ`) of `precondition='chunk'` as one Triton
program per matrix: a blocked inverse Cholesky factorisation in float32 whose bulk is `tl.dot` on BS×BS tiles
(op README, "A Triton kernel for the chunk-start factor"). The Triton chunk path's factor for K <= 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_mesa.ops.mesa.kernel_utils import DOT_PRECISIONS, chunk_end_state, mesa_dot

# the operand precision of the blocked products: only step counts depend on W's accuracy (op README), and tf32x3
# keeps the float32 factorisation's, which keeps float64's (benchmarks/results/factor_variants_cpu.md)
FACTOR_DOT_PRECISION = 'tf32x3'


@triton.jit
def _load_m(h, he, b_a, b_lamb, i, j, o_b, K: tl.constexpr, BS: tl.constexpr, HAS_END: tl.constexpr):
    # block (i, j) of M = a (H + Hᵀ) / 2 + Λ, formed from h_kk as it is read (as `chunk_start_factor` symmetrises),
    # H the sum of the chunk's start and end states with HAS_END; rows and columns past K read as the identity's,
    # which leaves the factor of the leading K×K block unchanged
    o_i, o_j = i * BS + o_b, j * BS + o_b
    m_i, m_j = o_i < K, o_j < K
    m_ij = m_i[:, None] & m_j[None, :]
    b_h = tl.load(h + o_i[:, None] * K + o_j[None, :], mask=m_ij, other=0.).to(tl.float32)
    b_h += tl.load(h + o_j[None, :] * K + o_i[:, None], mask=m_ij, other=0.).to(tl.float32)
    if HAS_END:
        b_h += tl.load(he + o_i[:, None] * K + o_j[None, :], mask=m_ij, other=0.).to(tl.float32)
        b_h += tl.load(he + o_j[None, :] * K + o_i[:, None], mask=m_ij, other=0.).to(tl.float32)
    b_m = b_a * b_h * 0.5
    if i == j:
        b_d = tl.where(m_i, b_lamb, 1.)
        b_m += tl.where(o_b[:, None] == o_b[None, :], b_d[:, None], 0.)
    return b_m


@triton.jit
def _block_ptrs(w, i, j, o_b, K: tl.constexpr, BS: tl.constexpr, TRANS: tl.constexpr):
    # pointers and mask of block (i, j) of a K×K matrix, or of its transpose (element (r, c) at (j·BS + c, i·BS + r)):
    # block (i, j) of X = Wᵀ
    o_i, o_j = i * BS + o_b, j * BS + o_b
    if TRANS:
        p = w + o_j[None, :] * K + o_i[:, None]
    else:
        p = w + o_i[:, None] * K + o_j[None, :]
    return p, (o_i[:, None] < K) & (o_j[None, :] < K)


@triton.jit
def _chol_inv_block(b_s, o_b, BS: tl.constexpr):
    # X = L⁻¹ for the Cholesky factor L Lᵀ = S of an SPD BS×BS tile, column by column: step c takes L's column c
    # from the Schur complement and applies the same forward-substitution step to X (from I). Registers cannot be
    # indexed, so column c is read out by a masked sum. Also returns 1 where a pivot was not positive and finite.
    b_x = tl.where(o_b[:, None] == o_b[None, :], 1., 0.)
    bad = tl.zeros([], dtype=tl.int32)
    for c in range(BS):
        sel = o_b == c
        b_col = tl.sum(tl.where(sel[None, :], b_s, 0.), axis=1)
        b_row = tl.sum(tl.where(sel[:, None], b_s, 0.), axis=0)
        b_d = tl.sum(tl.where(sel, b_col, 0.), axis=0)
        good = (b_d > 0) & (b_d < float('inf'))
        bad = tl.maximum(bad, tl.where(good, 0, 1))
        # past a bad pivot the steps change nothing (no overflow): the caller overwrites W with the fallback
        b_inv = tl.where(good, 1. / tl.sqrt(tl.where(good, b_d, 1.)), 0.)
        # L[:, c] (rows >= c) and the same values as a row vector: S stays exactly symmetric, so its row c is its column c
        b_l = tl.where(o_b >= c, b_col * b_inv, 0.)
        b_lr = tl.where(o_b >= c, b_row * b_inv, 0.)
        b_s = b_s - b_l[:, None] * b_lr[None, :]
        b_xc = tl.sum(tl.where(sel[:, None], b_x, 0.), axis=0) * b_inv
        b_x = tl.where(sel[:, None], b_xc[None, :], b_x - tl.where(o_b > c, b_l, 0.)[:, None] * b_xc[None, :])
    return b_x, bad


@triton.jit
def chunk_start_factor_kernel(
    h,
    ht,
    chunk_indices,
    a,
    lamb,
    w,
    need,
    items,
    NL,
    NT,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    BS: tl.constexpr,
    NB: tl.constexpr,
    PREC: tl.constexpr,
    HAS_NEED: tl.constexpr,
    HAS_ITEMS: tl.constexpr,
    HAS_END: tl.constexpr,
    HAS_A: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    # One matrix per program. X = L⁻¹ (lower) by block rows: for block row i, with X's rows above it done,
    #   G_k = Σ_{m<=k} M_im X_kmᵀ (= L_ik),   S = M_ii - Σ_k G_k G_kᵀ,   X_ii = chol(S)⁻¹,
    #   X_ij = -X_ii Σ_{j<=k<i} G_k X_kj.
    # X is kept in `w` as W = Xᵀ (the output), read back from L2; G_k waits in W's lower triangle (zero at the end).
    i_n = tl.program_id(0).to(tl.int64)
    if HAS_NEED:
        # only the matrices asked for (precondition='auto': chunks with an unconverged row or a predicted Jacobi stall);
        # W stays unset elsewhere
        if tl.load(need + i_n) == 0:
            return
        if HAS_ITEMS:
            # and listed, after the list's count (the work list of 'auto''s second CG pass: `chunk_cg`)
            tl.store(items + 1 + tl.atomic_add(items, 1), i_n.to(tl.int32))
    he = h
    if HAS_END:
        # M = a (H_c + H_{c+1}) + Λ: the state after the chunk, the next chunk's start or the sequence's final state
        he = chunk_end_state(h, ht, chunk_indices, i_n // H, i_n % H, NT, H, K * K, IS_VARLEN)
    h += i_n * K * K
    w += i_n * K * K
    if HAS_A:
        b_a = tl.load(a + i_n).to(tl.float32)
    else:
        b_a = scale
    o_b = tl.arange(0, BS)
    bad = tl.zeros([], dtype=tl.int32)
    for i in range(NB):
        b_lamb = tl.load(lamb + (i_n % NL) * K + i * BS + o_b, mask=i * BS + o_b < K, other=1.).to(tl.float32)
        b_s = _load_m(h, he, b_a, b_lamb, i, i, o_b, K, BS, HAS_END)
        for k in range(i):
            b_g = tl.zeros([BS, BS], dtype=tl.float32)
            for m in range(k + 1):
                p_x, m_x = _block_ptrs(w, m, k, o_b, K, BS, False)
                b_g = mesa_dot(_load_m(h, he, b_a, b_lamb, i, m, o_b, K, BS, HAS_END), tl.load(p_x, mask=m_x, other=0.), b_g,
                               PREC, False)
            b_s -= mesa_dot(b_g, tl.trans(b_g), tl.zeros([BS, BS], dtype=tl.float32), PREC, False)
            p_g, m_g = _block_ptrs(w, i, k, o_b, K, BS, False)
            tl.store(p_g, b_g, mask=m_g)
        tl.debug_barrier()
        b_x, bad_i = _chol_inv_block(b_s, o_b, BS)
        bad = tl.maximum(bad, bad_i)
        for j in range(i):
            b_y = tl.zeros([BS, BS], dtype=tl.float32)
            for k in range(j, i):
                p_g, m_g = _block_ptrs(w, i, k, o_b, K, BS, False)
                p_x, m_x = _block_ptrs(w, k, j, o_b, K, BS, True)
                b_y = mesa_dot(tl.load(p_g, mask=m_g, other=0.), tl.load(p_x, mask=m_x, other=0.), b_y, PREC, False)
            b_xij = -mesa_dot(b_x, b_y, tl.zeros([BS, BS], dtype=tl.float32), PREC, False)
            p_x, m_x = _block_ptrs(w, i, j, o_b, K, BS, True)
            tl.store(p_x, b_xij, mask=m_x)
        p_x, m_x = _block_ptrs(w, i, i, o_b, K, BS, True)
        tl.store(p_x, b_x, mask=m_x)
        tl.debug_barrier()
        for k in range(i):
            p_g, m_g = _block_ptrs(w, i, k, o_b, K, BS, False)
            tl.store(p_g, tl.zeros([BS, BS], dtype=tl.float32), mask=m_g)
    if bad > 0:
        # a non-positive pivot (M indefinite in float32): W = diag(M)^(-1/2), as `chunk_start_factor` falls back
        tl.debug_barrier()
        for i in range(NB):
            b_lamb = tl.load(lamb + (i_n % NL) * K + i * BS + o_b, mask=i * BS + o_b < K, other=1.).to(tl.float32)
            b_m = _load_m(h, he, b_a, b_lamb, i, i, o_b, K, BS, HAS_END)
            b_d = tl.sum(tl.where(o_b[:, None] == o_b[None, :], b_m, 0.), axis=1)
            b_d = 1. / tl.sqrt(tl.maximum(b_d, 1.1754943508222875e-38))
            for j in range(NB):
                p_w, m_w = _block_ptrs(w, i, j, o_b, K, BS, False)
                b_w = tl.where((o_b[:, None] == o_b[None, :]) & (i == j), b_d[:, None], 0.)
                tl.store(p_w, b_w, mask=m_w)


def chunk_start_factor_triton(
    h_kk: torch.Tensor,
    a: torch.Tensor | float,
    lamb: torch.Tensor,
    dtype: torch.dtype,
    precision: str | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
    maxnreg: int | None = None,
    need: torch.Tensor | None = None,
    ht_kk: torch.Tensor | None = None,
    chunk_indices: torch.LongTensor | None = None,
    items: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    `precond.chunk_start_factor` by a Triton kernel: `W = L⁻ᵀ` for `L Lᵀ = M = a H + Λ`, so that `M⁻¹ = W Wᵀ`,
    factorised in float32 (products in `precision`); where a pivot is not positive (`M` indefinite at float32's
    accuracy) `W = diag(M)^(-1/2)` for that matrix. With `ht_kk`, `H` is the sum of each chunk's start and end
    states, `H_c + H_{c+1}` (`precond.chunk_end_states`), read from `h_kk` and `ht_kk` as they are.

    Args:
        h_kk (torch.Tensor): chunk-start states `[..., K, K]`, K <= 128; `[B, NT, H, K, K]` with `ht_kk`.
        a (torch.Tensor or float): the weight of `H`, `[...]` (h_kk's batch) or one number for all.
        lamb (torch.Tensor): the ridge, broadcastable to `[..., K]`.
        dtype (torch.dtype): the dtype of `W`.
        precision (str, Optional): operand precision of the blocked products, one of `chunk_h.DOT_PRECISIONS`.
            Default: `FACTOR_DOT_PRECISION`.
        block_size (int, Optional): the tile width BS, 16 or 32. Default: 16, the fastest on an H200
            (benchmarks/results/factor_h200.md).
        num_warps (int, Optional): warps a program. Default: 4 for BS = 32, else 1.
        maxnreg (int, Optional): a register cap a thread (Triton's launch option), for more programs an SM.
        need (torch.Tensor, Optional): integers of `a`'s size (any shape): only the matrices where it is not 0 are
            factorised, `W` is left unset for the others. Default: all.
        ht_kk (torch.Tensor, Optional): the final states `[N, H, K, K]` of `chunk_mesa_fwd_states`: each
            sequence's last chunk ends there. Default: `None` (`H = H_c`).
        chunk_indices (torch.LongTensor, Optional): with `ht_kk` and varlen (B = 1), fla's
            `prepare_chunk_indices(cu_seqlens, chunk_size)`: which chunk is a sequence's last.
        items (torch.Tensor, Optional): with `need`, int32 `[N + 1]`, zeroed: the index (in `need`'s flat order) of
            each matrix factorised is appended after the count `items[0]`, in no set order. Default: `None`.

    Returns:
        W (torch.Tensor): `[..., K, K]`, upper triangular.
    """
    if h_kk.ndim < 2 or h_kk.shape[-1] != h_kk.shape[-2]:
        raise ValueError(f"`h_kk` must be [..., K, K], got shape {tuple(h_kk.shape)}")
    K = h_kk.shape[-1]
    if not 1 <= K <= 128:
        raise ValueError(f"`h_kk` must have 1 <= K <= 128, got K = {K}")
    batch = tuple(h_kk.shape[:-2])
    has_a = isinstance(a, torch.Tensor)
    if has_a and tuple(a.shape) != batch:
        raise ValueError(f"`a` must have shape {batch} (h_kk's batch), got {tuple(a.shape)}")
    if not has_a and not isinstance(a, (float, int)):
        raise TypeError(f"`a` must be a tensor or a number, got {type(a).__name__}")
    for name, x in (('h_kk', h_kk), ('a', a), ('lamb', lamb), ('ht_kk', ht_kk)):
        if not isinstance(x, torch.Tensor):
            continue
        if not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating tensor, got {x.dtype}")
        if x.device != h_kk.device:
            raise ValueError(f"`{name}` must be on h_kk's device {h_kk.device}, got {x.device}")
    try:
        lamb_full = lamb.expand(*batch, K)
    except RuntimeError:
        raise ValueError(f"`lamb` must broadcast to {(*batch, K)}, got shape {tuple(lamb.shape)}") from None
    lead = list(lamb.shape[:-1])
    while lead and lead[0] == 1:
        lead.pop(0)
    if lamb.shape[-1] == K and (not lead or tuple(lead) == batch[len(batch) - len(lead):]):
        # one row per matrix of the last dims (`[H, K]` for `[B, NT, H]` states): the kernel reads row n % rows in
        # place, no copy of Λ for every matrix
        lamb = lamb.reshape(-1, K).contiguous()
    else:
        lamb = lamb_full.reshape(-1, K).contiguous()
    if ht_kk is not None:
        _check_end_states(h_kk, ht_kk, chunk_indices)
    precision = FACTOR_DOT_PRECISION if precision is None else precision
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"`precision` must be one of {DOT_PRECISIONS}, got {precision!r}")
    BS = 16 if block_size is None else block_size
    if BS not in (16, 32):
        raise ValueError(f"`block_size` must be 16 or 32, got {block_size}")

    N = lamb_full.shape[:-1].numel()
    if need is not None and (need.numel() != N or need.is_floating_point() or need.device != h_kk.device):
        raise ValueError(f"`need` must hold {N} integers on {h_kk.device} (one per matrix), got {need.dtype} "
                         f"{tuple(need.shape)} on {need.device}")
    if items is not None and (need is None or items.dtype != torch.int32 or items.numel() != N + 1
                              or items.device != h_kk.device):
        raise ValueError(f"`items` must be {N + 1} int32 on {h_kk.device} with `need`, got {items.dtype} "
                         f"{tuple(items.shape)} on {items.device}" + ('' if need is not None else ' without `need`'))
    w = h_kk.new_empty(N, K, K, dtype=torch.float32)
    if N > 0:
        chunk_start_factor_kernel[(N,)](
            h=h_kk.reshape(N, K, K).contiguous(),
            ht=None if ht_kk is None else ht_kk.contiguous(),
            chunk_indices=chunk_indices,
            a=a.reshape(N).contiguous() if has_a else None,
            lamb=lamb,
            NL=lamb.shape[0],
            w=w,
            need=None if need is None else need.reshape(N).contiguous(),
            items=items,
            NT=h_kk.shape[1] if ht_kk is not None else 1,
            scale=1.0 if has_a else float(a),
            H=h_kk.shape[2] if ht_kk is not None else 1,
            K=K,
            BS=BS,
            NB=triton.cdiv(K, BS),
            PREC=precision,
            HAS_NEED=need is not None,
            HAS_ITEMS=items is not None,
            HAS_END=ht_kk is not None,
            HAS_A=has_a,
            IS_VARLEN=chunk_indices is not None,
            num_warps=num_warps if num_warps is not None else (4 if BS == 32 else 1),
            num_stages=1,
            **({} if maxnreg is None else {'maxnreg': maxnreg}),
        )
    return w.view(*batch, K, K).to(dtype)


def _check_end_states(h_kk, ht_kk, chunk_indices):
    """`h_kk [B, NT, H, K, K]`, `ht_kk [N, H, K, K]` (N = B, or the sequences of `chunk_indices` with B = 1)."""
    if h_kk.ndim != 5:
        raise ValueError(f"with `ht_kk`, `h_kk` must be [B, NT, H, K, K], got shape {tuple(h_kk.shape)}")
    B, NT, H, K = h_kk.shape[:4]
    if chunk_indices is not None and (B != 1 or chunk_indices.shape != (NT, 2)):
        raise ValueError(f"`chunk_indices` must be [NT, 2] = [{NT}, 2] with B = 1, got "
                         f"{tuple(chunk_indices.shape)} with B = {B}")
    if ht_kk.ndim != 4 or tuple(ht_kk.shape[1:]) != (H, K, K) or (chunk_indices is None and ht_kk.shape[0] != B):
        raise ValueError(f"`ht_kk` must be [N, H, K, K] with H, K = {H}, {K} (N = {B} without chunk_indices), "
                         f"got shape {tuple(ht_kk.shape)}")
