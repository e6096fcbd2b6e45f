# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The PyTorch path of the fused-recurrent op (CPU tensors): token by token, one CG solve per token."""

from __future__ import annotations

import torch

from fla_mesa.ops.mesa.solver import cg_solve
from fla_mesa.ops.mesa.utils import compute_dtype, l2norm, pad_varlen, unpad_varlen, zero_state


def recurrent_mesa_torch(
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
    return_cg_steps: bool = False,
    flag_unconverged: bool = False,
):
    r"""
    Token-by-token Mesa with the project's CG solver: `fused_recurrent_mesa`'s PyTorch path, and the reference of its
    kernel (`naive.naive_recurrent_mesa`).
    Returns `(o, final_state)`, plus `cg_steps [B, T, H]` when `return_cg_steps` (with `flag_unconverged`, `~n` for
    a token that did not reach `cg_tol`: `cg_solve`).
    """
    # padded tokens (g = beta = 0, q = 0) leave a shorter sequence's state as it was
    if cu_seqlens is not None:
        q, k, v, g, beta = (pad_varlen(x, cu_seqlens) for x in (q, k, v, g, beta))
    dtype, out_dtype = compute_dtype(q), v.dtype
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.to(dtype)), l2norm(k.to(dtype))
    q, k, v, g, beta, lamb = (x.to(dtype) for x in (q, k, v, g, beta, lamb))
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        h_kk, h_kv = zero_state(B, H, K, V, dtype, q.device)
    else:
        h_kk, h_kv = (h.to(dtype) for h in initial_state)
    o, steps = [], []
    for t in range(T):
        gamma = g[:, t].exp()[..., None, None]
        kb = k[:, t] * beta[:, t, :, None]
        h_kk = gamma * h_kk + kb[..., :, None] * k[:, t, :, None, :]
        h_kv = gamma * h_kv + kb[..., :, None] * v[:, t, :, None, :]
        if cg_max_steps == 0:
            x, n = q[:, t], torch.zeros(B, H, dtype=torch.int32, device=q.device)
        else:
            A = h_kk + torch.diag_embed(lamb)
            x, n = cg_solve(
                lambda p: torch.einsum('bhij,bhj->bhi', A, p),
                q[:, t], torch.diagonal(A, dim1=-2, dim2=-1), cg_max_steps, cg_tol, precondition,
                flag_unconverged=flag_unconverged,
            )
        o.append(torch.einsum('bhk,bhkv->bhv', x, h_kv))
        steps.append(n)
    o, steps = torch.stack(o, 1), torch.stack(steps, 1)
    if cu_seqlens is not None:
        o, steps = unpad_varlen(o, cu_seqlens), unpad_varlen(steps, cu_seqlens)
    final = (h_kk, h_kv) if output_final_state else None
    return (o.to(out_dtype), final, steps) if return_cg_steps else (o.to(out_dtype), final)
