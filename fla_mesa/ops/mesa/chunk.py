# Copyright (c) 2026, fla-mesa contributors. MIT license.

from __future__ import annotations

import torch
from fla.modules.l2norm import l2norm as fla_l2norm
from fla.ops.utils import chunk_local_cumsum, prepare_chunk_indices
from fla.utils import autocast_custom_bwd, autocast_custom_fwd, input_guard

from fla_mesa.ops.mesa.chunk_bwd import chunk_mesa_bwd_grads
from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
from fla_mesa.ops.mesa.chunk_h import chunk_mesa_fwd_states
from fla_mesa.ops.mesa.chunk_o import chunk_mesa_bwd_dx, chunk_mesa_fwd_o
from fla_mesa.ops.mesa.chunk_torch import chunk_mesa_bwd_torch, chunk_mesa_fwd_torch
from fla_mesa.ops.mesa.kernel_utils import RCP_LN2
from fla_mesa.ops.mesa.precond import DEFAULT_PRECONDITION, is_precondition
from fla_mesa.ops.mesa.utils import (
    L2NORM_EPS, check_inputs, compute_dtype, flags_unconverged, l2norm, min_log_decay, op_outputs, split_cg_steps, use_triton,
    warn_if_unconverged,
)


def chunk_log_decay(g, cu_seqlens, chunk_size, chunk_indices=None):
    """
    The in-chunk cumulative log-decay in log2 space (the kernels use exp2), float32. g = -inf (γ = 0) clamped to a g
    whose γ is 0 all the same: a -inf sum would make the decays between later tokens -inf - (-inf) = NaN.
    """
    return chunk_local_cumsum(g.float().clamp_min(min_log_decay(torch.float32)), chunk_size, scale=RCP_LN2,
                              cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)


def _prepare(k, v, g, beta, initial_state, cu_seqlens, chunk_size, g_cum=None):
    chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size) if cu_seqlens is not None else None
    if g_cum is None:
        g_cum = chunk_log_decay(g, cu_seqlens, chunk_size, chunk_indices)
    beta = beta.float()
    h_kk, h_kv, final_state = chunk_mesa_fwd_states(
        k, v, g_cum, beta, initial_state=initial_state, output_final_state=True,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size,
    )
    return chunk_indices, g_cum, beta, h_kk, h_kv, final_state


def chunk_mesa_fwd(
    q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size, flag_unconverged=False,
    g_cum=None
):
    """
    The Triton forward: `(o, x, steps, final_state, rescued)`, as `chunk_mesa_fwd_torch`; `g_cum`: `g`'s
    `chunk_log_decay` where the caller has it.
    """
    chunk_indices, g_cum, beta, h_kk, h_kv, final_state = _prepare(k, v, g, beta, initial_state, cu_seqlens, chunk_size,
                                                                   g_cum)
    if cg_max_steps == 0:
        # no solve: x = q, and o its readout
        x = q.float()
        steps = torch.zeros(q.shape[:3], dtype=torch.int32, device=q.device)
        o = chunk_mesa_fwd_o(x, k, v, g_cum, beta, h_kv, cu_seqlens, chunk_indices, chunk_size)
        return o, x, steps, final_state, None
    x, steps, o, rescued = chunk_mesa_cg(
        q, k, g_cum, beta, lamb.float(), h_kk, cg_max_steps, cg_tol, precondition,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size, v=v, h_kv=h_kv, o_dtype=v.dtype,
        flag_unconverged=flag_unconverged, return_rescued=True, ht_kk=final_state[0],
    )
    return o, x, steps, final_state, rescued


def chunk_mesa_bwd(
    x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size,
    flag_unconverged=False, rescued=None, dq_dtype=torch.float32, g_cum=None
):
    """
    The Triton backward: `(dq, dk, dv, dg, dbeta, dlamb, dh0, steps)`, as `chunk_mesa_bwd_torch`; dq in `dq_dtype`
    where the adjoint solve writes it so (bfloat16), else in float32; `g_cum` as `chunk_mesa_fwd` takes it (`g` is
    then unused).
    """
    chunk_indices, g_cum, beta, h_kk, h_kv, final_state = _prepare(k, v, g, beta, initial_state, cu_seqlens, chunk_size,
                                                                   g_cum)
    # only the chunk preconditioner reads a final state here (ht_kk, in the adjoint solve): the states after the last
    # token are freed as soon as they are no longer read, not kept through the gradients' allocations
    ht_kk = final_state[0]
    del final_state
    kw = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=chunk_size)
    steps = None
    if cg_max_steps == 0:
        # x = q: dq is dx itself and there is no solve to differentiate (e = 0 in the surrogate)
        dq = chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, **kw)
        e = torch.zeros_like(dq)
    else:
        # the adjoint solve (H_t + Λ) e_t = dx_t = S_t do_t (dx by the output pass, into the buffer that receives e)
        # the chunks the forward's 'auto' rescued skip Jacobi here: the adjoint solve has the same matrices; e in
        # float32 for the gradients below, and for bfloat16 q the kernel writes dq = e in bfloat16 beside it
        dq = torch.empty_like(k, dtype=torch.bfloat16) if dq_dtype == torch.bfloat16 else None
        e, steps, _ = chunk_mesa_cg(None, k, g_cum, beta, lamb.float(), h_kk, cg_max_steps, cg_tol, precondition,
                                    **kw, v=v, h_kv=h_kv, do=do, flag_unconverged=flag_unconverged,
                                    skip_jacobi=rescued, ht_kk=ht_kk, xl=dq)
        dq = e if dq is None else dq
    del ht_kk
    dk, dv, dg, dbeta, dlamb, dh0 = chunk_mesa_bwd_grads(
        x, e, do, k, v, g_cum, beta, h_kk, h_kv, initial_state=initial_state, dht=dht, **kw
    )
    return dq, dk, dv, dg, dbeta, dlamb, dh0, steps


def _use_triton_path(q: torch.Tensor) -> bool:
    # by the inputs alone, as fla picks its paths; K > 128 runs the PyTorch path: the CG kernel's K x K tile
    # overflows a Hopper SM's shared memory there
    return use_triton(q) and q.dtype != torch.float64 and q.shape[-1] <= 128


def qk_l2norm(x: torch.Tensor) -> torch.Tensor:
    """
    The L2 norm `chunk_mesa(..., use_qk_l2norm_in_kernel=True)` applies to q and to k: fla's `l2norm` (what its
    `L2Norm` module calls) on the Triton path, else `l2norm` in the solver's dtype. For callers that normalise outside
    the op (the layer, to recompute q's norm in the backward instead of keeping it).
    """
    if _use_triton_path(x):
        # the function, not a module built per call: that cost host time in every layer and step
        return fla_l2norm(x, eps=L2NORM_EPS)
    return l2norm(x.to(compute_dtype(x)))


class ChunkMesaFunction(torch.autograd.Function):

    @staticmethod
    @input_guard
    @autocast_custom_fwd
    def forward(
        ctx, q, k, v, g, beta, lamb, h0_kk, h0_kv, output_final_state, cg_max_steps, cg_tol, precondition, cu_seqlens,
        chunk_size, flag_unconverged, warn_adjoint,
    ):
        initial_state = None if h0_kk is None else (h0_kk, h0_kv)
        args = (cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size)
        triton = _use_triton_path(q)
        kw = dict(flag_unconverged=flag_unconverged)
        if triton:
            # the backward takes the forward's cumulative log-decay (float32, g's size) instead of g: no cumsum there
            kw['g_cum'] = chunk_log_decay(g, cu_seqlens, chunk_size)
        fwd = chunk_mesa_fwd if triton else chunk_mesa_fwd_torch
        o, x, steps, (ht_kk, ht_kv), rescued = fwd(q, k, v, g, beta, lamb, initial_state, *args, **kw)
        ctx.save_for_backward(x, k, v, kw.get('g_cum', g), beta, lamb, h0_kk, h0_kv, cu_seqlens, rescued)
        ctx.args, ctx.triton, ctx.q_dtype, ctx.warn_adjoint = args, triton, q.dtype, warn_adjoint
        ctx.g_dtype = g.dtype
        ctx.mark_non_differentiable(steps)
        if not output_final_state:
            ht_kk = ht_kv = None
        return o.to(v.dtype), ht_kk, ht_kv, steps

    @staticmethod
    @input_guard
    @autocast_custom_bwd
    def backward(ctx, do, dht_kk, dht_kv, dsteps):
        x, k, v, g, beta, lamb, h0_kk, h0_kv, cu_seqlens, rescued = ctx.saved_tensors
        cg_max_steps, cg_tol, precondition, _, chunk_size = ctx.args
        initial_state = None if h0_kk is None else (h0_kk, h0_kv)
        dht = None if dht_kk is None and dht_kv is None else (dht_kk, dht_kv)
        bwd = chunk_mesa_bwd if ctx.triton else chunk_mesa_bwd_torch
        # on the Triton path the saved `g` is the forward's g_cum
        kw = dict(dq_dtype=ctx.q_dtype, g_cum=g) if ctx.triton else {}
        dq, dk, dv, dg, dbeta, dlamb, dh0, steps = bwd(
            x, do, dht, k, v, None if ctx.triton else g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition,
            cu_seqlens, chunk_size, flag_unconverged=ctx.warn_adjoint, rescued=rescued, **kw
        )
        if ctx.warn_adjoint:
            # the adjoint solve has the forward's matrices and stopping rule, not its right-hand sides: it can stall
            # where the forward did not
            warn_if_unconverged('chunk_mesa backward (adjoint solve)', split_cg_steps(steps)[1], cg_max_steps, cg_tol,
                                stacklevel=2)
        dh0_kk, dh0_kv = (None, None) if dh0 is None else (dh0[0].to(h0_kk), dh0[1].to(h0_kv))
        return (
            dq.to(ctx.q_dtype), dk.to(k), dv.to(v), dg.to(ctx.g_dtype), dbeta.to(beta),
            dlamb.to(lamb), dh0_kk, dh0_kv, None, None, None, None, None, None, None, None,
        )


@torch.compiler.disable
def chunk_mesa(
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
    precondition: bool | str = DEFAULT_PRECONDITION,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    return_cg_steps: bool | str = False,
    chunk_size: int = 64,
    check_values: bool = True,
    return_cg_unconverged: bool = False,
    warn_unconverged: bool = False,
):
    r"""
    The Mesa layer, chunkwise in parallel over time, for training and prefill.
    Per head, `o_t = S_tᵀ (H_t + Λ)⁻¹ q_t` with `H_t = γ_t H_{t-1} + β_t k_t k_tᵀ`, `S_t = γ_t S_{t-1} + β_t k_t v_tᵀ`,
    `γ_t = exp(g_t)`, the solve done by conjugate gradient. The backward differentiates the solve implicitly
    (an adjoint CG solve), never through the CG iterations.

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
            when `cu_seqlens` is given. Default: `None` (zeros).
        output_final_state (bool, Optional):
            whether to return the final state, in the layout of `initial_state`. Default: `False`.
        cg_max_steps (int, Optional):
            at most this many CG iterations per token; `0` skips the solve (`q* = q`: gated linear attention,
            the paper's k = 0). Default: `30` (the paper's setting).
        cg_tol (float, Optional):
            a token stops once its relative residual `||b - A x|| / ||b||` is at most `cg_tol`; `None` runs every
            token for `cg_max_steps`, unless its residual falls below what the solve's arithmetic attains
            (`utils.residual_floor2`: on the Triton path 2e-7 with 16-bit keys, 4e-9 with float32 ones; on the PyTorch
            path 9e-10, 2e-18 in float64), past which steps change x by less than their own rounding. The backward's
            adjoint solve uses the same rule.
            Default: `1e-4`, which the paper found to match 30 fixed steps at about 9 steps on average.
        precondition (bool or str, Optional):
            Jacobi-preconditioned CG (with `diag(H_t) + Λ`); `False` is the paper's plain CG; `'chunk'` the
            chunk preconditioner `M_c = (H_c + H_{c+1}) / 2 + Λ`, the mean of chunk c's start and end states (op
            README), on both chunk paths; `'auto'` Jacobi, then the chunk preconditioner for the tokens Jacobi
            leaves above `cg_tol` only (their chunks' factors only; their steps count both solves), and straight away
            for the chunks where a static test of the chunk's states predicts that Jacobi stalls
            (`ChunkPieces.stall_score`). Default: `precond.DEFAULT_PRECONDITION`
            (`'auto'`).
        cu_seqlens (torch.LongTensor, Optional):
            cumulative sequence lengths `[N + 1]` of packed sequences (then `B` must be 1). Default: `None`.
        use_qk_l2norm_in_kernel (bool, Optional):
            L2-normalise q and k inside the op. Default: `False`.
        return_cg_steps (bool or str, Optional):
            also return the CG iterations of every token, `[B, T, H]` int32; `'encoded'`: with the tokens that
            stopped without reaching `cg_tol` as `~n` (= -n - 1) for their `n` steps, in the same tensor
            (`utils.split_cg_steps` decodes; no extra ops, what `MesaNet` keeps). Default: `False`.
        chunk_size (int, Optional):
            16, 32 or 64. Default: `64`.
        check_values (bool, Optional):
            check that `lamb > 0`, `g <= 0` (`-inf` allowed: γ = 0) and `beta >= 0` everywhere and that every input
            is finite (a `ValueError` otherwise), at the price of one host sync per call. `MesaNet`, whose inputs
            are valid by construction, turns it off. Default: `True`.
        return_cg_unconverged (bool, Optional):
            also return a bool `[B, T, H]` marking the tokens whose forward solve stopped without reaching `cg_tol`
            (at `cg_max_steps`, or at a breakdown), whose outputs may be far off; no host sync. All `False` with
            `cg_tol=None`. Default: `False`.
        warn_unconverged (bool, Optional):
            warn (`RuntimeWarning`, one host sync) when any token stopped without reaching `cg_tol`; the backward's
            adjoint solve then warns the same way (another host sync). Default: `False`.

    Returns:
        o (torch.Tensor): `[B, T, H, V]`, in the dtype of `v`.
        final_state (Tuple[torch.Tensor, torch.Tensor]): the final state if `output_final_state`, else `None`.
        cg_steps (torch.Tensor): `[B, T, H]`, only if `return_cg_steps` (encoded if `'encoded'`).
        cg_unconverged (torch.Tensor): `[B, T, H]` bool, only if `return_cg_unconverged`.

    Examples::
        >>> import torch, torch.nn.functional as F
        >>> from fla_mesa.ops.mesa import chunk_mesa
        >>> B, T, H, K, V = 2, 100, 4, 64, 32
        >>> q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        >>> v = torch.randn(B, T, H, V)
        >>> g = F.logsigmoid(torch.randn(B, T, H) + 4)
        >>> beta = torch.rand(B, T, H)
        >>> lamb = torch.full((H, K), 1.0)
        >>> o, (h_kk, h_kv) = chunk_mesa(q, k, v, g, beta, lamb, output_final_state=True, use_qk_l2norm_in_kernel=True)
        # varlen: pack the sequences into one row and pass their boundaries
        >>> from einops import rearrange
        >>> cu_seqlens = torch.tensor([0, 100, 200])
        >>> o_var, _ = chunk_mesa(*(rearrange(x, 'b t ... -> 1 (b t) ...') for x in (q, k, v, g, beta)), lamb,
        ...                       cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)
    """
    check_inputs(q, k, v, g, beta, lamb, initial_state, cu_seqlens, cg_max_steps, cg_tol, chunk_size, check_values)
    if not is_precondition(precondition):
        raise ValueError(f"`precondition` must be True (Jacobi), False (plain CG), 'chunk' or 'auto', got {precondition!r}")
    if use_qk_l2norm_in_kernel:
        q, k = qk_l2norm(q), qk_l2norm(k)
    h0_kk, h0_kv = (None, None) if initial_state is None else initial_state
    flag = flags_unconverged(return_cg_steps, return_cg_unconverged, warn_unconverged, cg_max_steps, cg_tol)
    o, ht_kk, ht_kv, steps = ChunkMesaFunction.apply(
        q, k, v, g, beta, lamb, h0_kk, h0_kv, output_final_state, cg_max_steps, cg_tol, precondition, cu_seqlens,
        chunk_size, flag, warn_unconverged and flag,
    )
    final_state = (ht_kk, ht_kv) if output_final_state else None
    return op_outputs('chunk_mesa', o, final_state, steps, flag, cg_max_steps, cg_tol, return_cg_steps, return_cg_unconverged,
                      warn_unconverged)
