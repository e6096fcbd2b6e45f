# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The Triton chunk path: host glue over the state, CG, readout and backward kernels."""

from __future__ import annotations

import torch
from fla.ops.common.chunk_o import chunk_fwd_o
from fla.ops.utils import chunk_local_cumsum, prepare_chunk_indices

from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
from fla_mesa.ops.mesa.chunk_h import chunk_mesa_fwd_h
from fla_mesa.ops.mesa.kernel_utils import RCP_LN2
from fla_mesa.ops.mesa.chunk_torch import chunk_mesa_bwd_torch, chunk_mesa_fwd_torch
from fla_mesa.ops.mesa.naive import pad_varlen, unpad_varlen
from fla_mesa.ops.mesa.utils import min_log_decay

try:
    from fla_mesa.ops.mesa.chunk_bwd import chunk_mesa_bwd_dx, chunk_mesa_bwd_grads
    HAS_BWD = True
except ImportError:
    # without the backward kernels, the backward's sums run in PyTorch around the Triton adjoint solve
    HAS_BWD = False


def _prepare(k, v, g, beta, initial_state, cu_seqlens, chunk_size):
    chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size) if cu_seqlens is not None else None
    # in-chunk cumulative log-decay in log2 space: the kernels use exp2. g = -inf (γ = 0) clamped to a g whose
    # γ is 0 all the same: a -inf sum would make the decays between later tokens -inf - (-inf) = NaN
    g_cum = chunk_local_cumsum(g.float().clamp_min(min_log_decay(torch.float32)), chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
    beta = beta.float()
    h_kk, h_kv, final_state = chunk_mesa_fwd_h(
        k, v, g_cum, beta, initial_state=initial_state, output_final_state=True,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size,
    )
    return chunk_indices, g_cum, beta, h_kk, h_kv, final_state


def chunk_mesa_fwd(
    q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size, flag_unconverged=False
):
    """Returns `(o, x, steps, final_state)` like the PyTorch path."""
    if cg_max_steps == 0 and q.dtype == torch.float32:
        # fla's chunk_fwd_o multiplies float32 in tf32 on a GPU (1e-3 off); under bf16 inputs' rounding that is
        # harmless, for float32 inputs the PyTorch path keeps o exact
        return chunk_mesa_fwd_torch(q, k, v, g, beta, lamb, initial_state, 0, cg_tol, precondition, cu_seqlens, chunk_size)
    chunk_indices, g_cum, beta, h_kk, h_kv, final_state = _prepare(k, v, g, beta, initial_state, cu_seqlens, chunk_size)
    if cg_max_steps == 0:
        # no solve: x = q, and o is gated linear attention with β folded into v
        x = q.float()
        steps = torch.zeros(q.shape[:3], dtype=torch.int32, device=q.device)
        o = chunk_fwd_o(x, k.float(), v.float() * beta[..., None], h_kv, g=g_cum, scale=1.0,
                        cu_seqlens=cu_seqlens, chunk_size=chunk_size, chunk_indices=chunk_indices)
        return o, x, steps, final_state
    x, steps, o = chunk_mesa_cg(
        q, k, g_cum, beta, lamb.float(), h_kk, cg_max_steps, cg_tol, precondition,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size, v=v, h_kv=h_kv, o_dtype=v.dtype,
        flag_unconverged=flag_unconverged,
    )
    return o, x, steps, final_state


def chunk_mesa_bwd(x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size):
    """Returns `(dq, dk, dv, dg, dbeta, dlamb, dh0)` like the PyTorch path."""
    if not HAS_BWD:
        return chunk_mesa_bwd_hybrid(
            x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size
        )
    chunk_indices, g_cum, beta, h_kk, h_kv, _ = _prepare(k, v, g, beta, initial_state, cu_seqlens, chunk_size)
    kw = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size)
    if cg_max_steps == 0:
        # x = q: dq is dx itself and there is no solve to differentiate (e = 0 in the surrogate)
        dq = chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, **kw)
        e = torch.zeros_like(dq)
    else:
        # the adjoint solve (H_t + Λ) e_t = dx_t = S_t do_t, its right-hand side formed inside the CG kernel
        dq, _, _ = chunk_mesa_cg(None, k, g_cum, beta, lamb.float(), h_kk, cg_max_steps, cg_tol, precondition, **kw,
                                 v=v, h_kv=h_kv, do=do)
        e = dq
    dk, dv, dg, dbeta, dlamb, dh0 = chunk_mesa_bwd_grads(
        x, e, do, k, v, g_cum, beta, h_kk, h_kv, initial_state=initial_state, dht=dht, **kw
    )
    return dq, dk, dv, dg, dbeta, dlamb, dh0


def chunk_mesa_bwd_hybrid(
    x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size
):
    """The PyTorch backward with its adjoint solve, the iterative part, run by the Triton CG kernel."""
    chunk_indices, g_cum, beta32, h_kk, _, _ = _prepare(k, v, g, beta, initial_state, cu_seqlens, chunk_size)

    def solve(dx):
        # dx comes in the PyTorch path's layout: one padded row per sequence when varlen
        if cu_seqlens is not None:
            dx = unpad_varlen(dx, cu_seqlens)
        e, _, _ = chunk_mesa_cg(
            dx, k, g_cum, beta32, lamb.float(), h_kk, cg_max_steps, cg_tol, precondition,
            cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size,
        )
        return pad_varlen(e, cu_seqlens) if cu_seqlens is not None else e

    return chunk_mesa_bwd_torch(
        x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size, solve
    )
