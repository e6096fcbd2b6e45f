# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
PyTorch references for Mesa, for tests: an exact solve (in float64 the ground truth), and the token-by-token and
chunkwise algorithms, which are the ops' own PyTorch paths (`recurrent_torch`, `chunk_torch`) under reference names.
"""

from __future__ import annotations

import torch

from fla_mesa.ops.mesa.chunk_torch import chunk_mesa_fwd_torch
from fla_mesa.ops.mesa.recurrent_torch import recurrent_mesa_torch
from fla_mesa.ops.mesa.utils import compute_dtype, l2norm, zero_state

# token-by-token Mesa with the project's CG solver (what the fused-recurrent kernel computes)
naive_recurrent_mesa = recurrent_mesa_torch


def naive_exact_mesa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    lamb: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    **kwargs,
):
    r"""
    The exact Mesa layer: materialises `H_t` and `S_t` for every token and solves `(H_t + Λ) x_t = q_t`
    with `torch.linalg.solve`. Differentiable by autograd; in float64 it is the ground truth of every test.
    CG arguments in `kwargs` are accepted and ignored. Returns `(o, final_state)`.
    """
    if cu_seqlens is not None:
        outs = [
            naive_exact_mesa(
                *(x[:, bos:eos] for x in (q, k, v, g, beta)), lamb,
                initial_state=None if initial_state is None else tuple(h[i:i + 1] for h in initial_state),
                output_final_state=output_final_state,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            )
            for i, (bos, eos) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
        ]
        o = torch.cat([o for o, _ in outs], 1)
        final = tuple(torch.cat(h, 0) for h in zip(*[s for _, s in outs])) if output_final_state else None
        return o, final

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
    o = []
    for t in range(T):
        gamma = g[:, t].exp()[..., None, None]
        kb = k[:, t] * beta[:, t, :, None]
        h_kk = gamma * h_kk + kb[..., :, None] * k[:, t, :, None, :]
        h_kv = gamma * h_kv + kb[..., :, None] * v[:, t, :, None, :]
        x = torch.linalg.solve(h_kk + torch.diag_embed(lamb), q[:, t])
        o.append(torch.einsum('bhk,bhkv->bhv', x, h_kv))
    o = torch.stack(o, 1)
    return o.to(out_dtype), ((h_kk, h_kv) if output_final_state else None)


def naive_chunk_mesa(
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
    chunk_size: int = 64,
    flag_unconverged: bool = False,
):
    r"""
    Chunkwise-parallel Mesa forward in PyTorch (`chunk_mesa`'s PyTorch path): the algorithm of the Triton chunk kernels.
    Returns `(o, final_state)`, plus `cg_steps [B, T, H]` when `return_cg_steps` (`~n` where a token did not reach
    `cg_tol`, with `flag_unconverged`).
    """
    if use_qk_l2norm_in_kernel:
        dtype = compute_dtype(q)
        q, k = l2norm(q.to(dtype)), l2norm(k.to(dtype))
    o, _, steps, final, _ = chunk_mesa_fwd_torch(
        q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size, flag_unconverged
    )
    final = final if output_final_state else None
    return (o.to(v.dtype), final, steps) if return_cg_steps else (o.to(v.dtype), final)
