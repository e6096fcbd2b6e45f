# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The chunk preconditioner `M_c = (H_c + H_{c+1}) / 2 + Λ`, the mean of chunk c's start and end states (op README,
"Chunk preconditioner"), one definition for the PyTorch and Triton chunk paths: a factor `W` with `M_c⁻¹ = W Wᵀ`,
applied to a chunk's rows as `z = (r W) Wᵀ`."""

from __future__ import annotations

import torch

# the default `precondition` of chunk_mesa, the layer and the config: 'auto' (Jacobi, the chunk preconditioner
# only for the tokens Jacobi leaves unconverged, or for the chunks where Jacobi is predicted to stall): a small cost
# where Jacobi converges, no silent failure where it does not (op README, "`precondition='auto'`");
# fused_recurrent_mesa keeps Jacobi
DEFAULT_PRECONDITION: bool | str = 'auto'


def is_precondition(value) -> bool:
    """Whether `value` is a `precondition` of the chunk paths: `True` (Jacobi), `False` (plain CG), 'chunk' or 'auto'."""
    return isinstance(value, bool) or (isinstance(value, str) and value in ('chunk', 'auto'))


# the dtype the Triton path stores `W` in: float32 keeps the PyTorch path's step counts; bfloat16 halves the memory
# and saves a product in each of the two applications a step, for more steps on the hardest states (op README)
FACTOR_DTYPE = torch.float32

# 'auto' sends a chunk (and head) straight to the chunk preconditioner, Jacobi skipped, where its
# `jacobi_stall_score` (`ChunkPieces.stall_score`) exceeds this (‖F‖_F > 7): almost no benign state of the predictor
# study (K <= 128) scored above it, most hard chunks do (op README, "`precondition='auto'`")
JACOBI_STALL_FF2 = 49.0


def chunk_start_factor(
    h_kk: torch.Tensor, a: torch.Tensor, lamb: torch.Tensor, dtype: torch.dtype, compute_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    r"""
    `W = L⁻ᵀ` for the Cholesky factor `L Lᵀ = M = a H + Λ`, so that `M⁻¹ = W Wᵀ`: symmetric whatever `W`'s rounding,
    so CG with it stays preconditioned CG and converges to CG's own answer (rounding changes step counts only).
    Factorised in float64 (the condition number of `M` is the state's); where even that fails (a state beyond
    float64), `W = diag(M)^(-1/2)`.

    Args:
        h_kk (torch.Tensor): states `[..., K, K]` (the chunk paths: `H_c + H_{c+1}`, `chunk_end_states`).
        a (torch.Tensor): the weight of each state, `[...]` (the chunk paths: 1/2).
        lamb (torch.Tensor): the ridge, broadcastable to `[..., K]`.
        dtype (torch.dtype): the dtype of `W`.
        compute_dtype (torch.dtype): the dtype of the factorisation. Default: float64.

    Returns:
        W (torch.Tensor): `[..., K, K]`, upper triangular.
    """
    with torch.no_grad():
        K = h_kk.shape[-1]
        m = a.to(compute_dtype)[..., None, None] * h_kk.to(compute_dtype)
        m = (m + m.transpose(-1, -2)) / 2 + torch.diag_embed(lamb.to(compute_dtype).expand(*a.shape, K))
        L, info = torch.linalg.cholesky_ex(m)
        d = torch.diagonal(m, dim1=-2, dim2=-1).clamp_min(torch.finfo(compute_dtype).tiny).sqrt()
        L = torch.where((info != 0)[..., None, None], torch.diag_embed(d), L)
        eye = torch.eye(K, dtype=compute_dtype, device=m.device).expand_as(L)
        return torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2).to(dtype)


def jacobi_stall_score(h_kk: torch.Tensor, a: torch.Tensor, lamb: torch.Tensor) -> torch.Tensor:
    r"""
    `‖F‖_F²` for `F` the off-diagonal part of `D^-1/2 M D^-1/2`, `M = a H + Λ`, `D = diag(M)`: how far the
    Jacobi-scaled chunk-start matrix is from the identity, `ff2 = a² Σ_{i≠j} H_ij² u_i u_j` with
    `u_i = 1 / (a H_ii + λ_i)`. 'auto' skips Jacobi where it exceeds `JACOBI_STALL_FF2`. In float32 (the input's
    dtype if wider), no host sync.

    Args:
        h_kk (torch.Tensor): states `[..., K, K]` (the chunk paths: `H_c + H_{c+1}`).
        a (torch.Tensor): the weight of each state, `[...]` (the chunk paths: 1/2).
        lamb (torch.Tensor): the ridge, broadcastable to `[..., K]`.

    Returns:
        ff2 (torch.Tensor): `[...]`.
    """
    with torch.no_grad():
        dtype = torch.promote_types(h_kk.dtype, torch.float32)
        ah = a.to(dtype)[..., None, None] * h_kk.to(dtype)
        u = 1 / (torch.diagonal(ah, dim1=-2, dim2=-1) + lamb.to(dtype))
        off = ~torch.eye(h_kk.shape[-1], dtype=torch.bool, device=h_kk.device)
        return (ah.square() * u[..., :, None] * u[..., None, :] * off).sum((-2, -1))


def apply_factor(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`z = M⁻¹ r` for rows `r [..., C, K]` of the chunks of `w [..., K, K]`."""
    return (r @ w) @ w.transpose(-1, -2)


def chunk_end_states(h_kk: torch.Tensor, ht_kk: torch.Tensor,
                     chunk_indices: torch.LongTensor | None = None) -> torch.Tensor:
    r"""
    The state after every chunk, `H_{c+1}`, in the layout of the chunk-start states `h_kk [B, NT, H, K, K]` of
    `chunk_mesa_fwd_states`: the next chunk's start state, or at a sequence's last chunk its final state from
    `ht_kk [N, H, K, K]` (varlen, B = 1: the sequences of fla's `chunk_indices`). A new tensor (the Triton factor and
    stall kernels read both states in place instead); no host sync.
    """
    B, NT = h_kk.shape[:2]
    flat = torch.cat([h_kk.flatten(0, 1), ht_kk])
    c = torch.arange(B * NT, device=h_kk.device)
    if chunk_indices is None:
        seq, last = c // NT, c % NT == NT - 1
    else:
        seq = chunk_indices[:, 0].to(h_kk.device)
        last = torch.cat([seq[1:] != seq[:-1], seq.new_ones(1, dtype=torch.bool)])
    return flat[torch.where(last, B * NT + seq, c + 1)].view_as(h_kk)
