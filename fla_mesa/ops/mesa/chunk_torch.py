# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The PyTorch chunk path (CPU tensors, float64, and the fallback for kernels not available): dtype and varlen glue."""

from __future__ import annotations

from fla_mesa.ops.mesa.naive import naive_chunk_mesa_bwd, naive_chunk_mesa_fwd, pad_varlen, unpad_varlen
from fla_mesa.ops.mesa.utils import compute_dtype


def chunk_mesa_fwd_torch(
    q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size, flag_unconverged=False
):
    dtype = compute_dtype(q)
    q, k, v, g, beta, lamb = (x.to(dtype) for x in (q, k, v, g, beta, lamb))
    if cu_seqlens is not None:
        q, k, v, g, beta = (pad_varlen(x, cu_seqlens) for x in (q, k, v, g, beta))
    o, x, steps, final = naive_chunk_mesa_fwd(
        q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, chunk_size, flag_unconverged
    )
    if cu_seqlens is not None:
        o, x, steps = (unpad_varlen(t, cu_seqlens) for t in (o, x, steps))
    return o, x, steps, final


def chunk_mesa_bwd_torch(
    x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size, solve=None
):
    dtype = x.dtype
    k, v, g, beta, lamb, do = (t.to(dtype) for t in (k, v, g, beta, lamb, do))
    if cu_seqlens is not None:
        x, do, k, v, g, beta = (pad_varlen(t, cu_seqlens) for t in (x, do, k, v, g, beta))
    grads = naive_chunk_mesa_bwd(
        x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, chunk_size, solve
    )
    dq, dk, dv, dg, dbeta, dlamb, dh0 = grads
    if cu_seqlens is not None:
        dq, dk, dv, dg, dbeta = (unpad_varlen(t, cu_seqlens) for t in (dq, dk, dv, dg, dbeta))
    return dq, dk, dv, dg, dbeta, dlamb, dh0
