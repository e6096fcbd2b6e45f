# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""PyTorch references for Mesa: an exact solve, token-by-token CG, and the chunkwise algorithm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fla_mesa.ops.mesa.precond import apply_factor, chunk_start_factor
from fla_mesa.ops.mesa.solver import cg_solve
from fla_mesa.ops.mesa.utils import compute_dtype, l2norm, min_log_decay


def pad_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`[1, T, ...]` packed sequences to a zero-padded batch `[N, T_max, ...]`."""
    lens = cu_seqlens.diff()
    pos = torch.arange(int(lens.max()), device=x.device)
    mask = pos < lens[:, None]
    idx = (cu_seqlens[:-1, None] + pos).clamp_max(x.shape[1] - 1)
    mask = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
    return x[0][idx] * mask


def unpad_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of `pad_varlen`: `[N, T_max, ...]` back to `[1, T, ...]`."""
    lens = cu_seqlens.diff()
    mask = torch.arange(x.shape[1], device=x.device) < lens[:, None]
    return x[mask].unsqueeze(0)


def _zero_state(B, H, K, V, dtype, device):
    return (torch.zeros(B, H, K, K, dtype=dtype, device=device), torch.zeros(B, H, K, V, dtype=dtype, device=device))


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
        h_kk, h_kv = _zero_state(B, H, K, V, dtype, q.device)
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


def naive_recurrent_mesa(
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
    Token-by-token Mesa with the project's CG solver (what the fused-recurrent kernel computes).
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
        h_kk, h_kv = _zero_state(B, H, K, V, dtype, q.device)
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


class ChunkPieces:
    r"""
    The chunkwise form of one Mesa call, in the layout `[B, H, NT, C, ...]` (README.md, "Chunkwise form").
    Built from differentiable torch ops, so autograd through it gives the implicit backward's sums.
    """

    def __init__(self, k, v, g, beta, lamb, initial_state, chunk_size):
        B, T, H, K = k.shape
        V = v.shape[-1]
        C = chunk_size
        NT = -(-T // C)
        pad = NT * C - T

        def chunk(x):
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
            return x.reshape(B, NT, C, *x.shape[2:]).movedim(3, 1)

        self.T, self.pad, self.chunk = T, pad, chunk
        k, v = chunk(k), chunk(v)
        # padded tokens have g = beta = 0: they leave the states unchanged. g = -inf clamped to a finite g whose
        # γ is 0 all the same (else the differences of the cumulative sums after it are NaN); autograd through the
        # clamp gives such a token dg = 0, γ's own derivative there
        gc = chunk(g.clamp_min(min_log_decay(g.dtype))).cumsum(-1)
        beta = chunk(beta)
        self.k, self.v, self.lamb = k, v, lamb[None, :, None, None, :]
        self.decay = gc.exp()[..., None]
        causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
        diff = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float('-inf'))
        self.M = diff.exp() * beta[..., None, :]

        if initial_state is None:
            h_kk, h_kv = _zero_state(B, H, K, V, k.dtype, k.device)
        else:
            h_kk, h_kv = (h.to(k.dtype) for h in initial_state)
        w = (gc[..., -1:] - gc).exp() * beta
        kw = k * w[..., None]
        Hs, Ss = [], []
        for i in range(NT):
            Hs.append(h_kk)
            Ss.append(h_kv)
            d = gc[:, :, i, -1, None, None].exp()
            h_kk = d * h_kk + kw[:, :, i].transpose(-1, -2) @ k[:, :, i]
            h_kv = d * h_kv + kw[:, :, i].transpose(-1, -2) @ v[:, :, i]
        self.H, self.S = torch.stack(Hs, 2), torch.stack(Ss, 2)
        self.final_state = (h_kk, h_kv)
        self.diag = self.decay * torch.diagonal(self.H, dim1=-2, dim2=-1)[..., None, :] + self.M @ k.pow(2) + self.lamb

    def chunk_start_preconditioner(self):
        """
        `z = M_c⁻¹ r` for every token of chunk c, `M_c = a_c H_c + Λ` with `a_c` the decay from the chunk's start to
        its middle token (op README, "Chunk-start preconditioner"), as `(r W) Wᵀ` with the factor `W` of
        `precond.chunk_start_factor` that the Triton path uses too. Rounding in `W` changes step counts, never what CG
        converges to.
        """
        C = self.decay.shape[-2]
        w = chunk_start_factor(self.H.detach(), self.decay[..., C // 2, 0].detach(), self.lamb[:, :, 0].detach(),
                               self.k.dtype)
        return lambda r: apply_factor(r, w)

    def preconditioner(self, precondition):
        """What `cg_solve` takes for the op's `precondition`: `True`, `False`, or 'chunk'."""
        if precondition == 'chunk':
            return self.chunk_start_preconditioner()
        return bool(precondition)

    def matvec(self, p):
        """`A_t p_t` for every token: `p [B, H, NT, C, K]`."""
        # H p, not pᵀ H: equal for a symmetric H, but the gradient of a given (maybe asymmetric) h_kk is −e xᵀ
        return self.decay * (p @ self.H.transpose(-1, -2)) + ((p @ self.k.transpose(-1, -2)) * self.M) @ self.k + self.lamb * p

    def readout(self, x):
        """`o_t = S_tᵀ x_t`: gated linear attention with the query x."""
        return self.decay * (x @ self.S) + ((x @ self.k.transpose(-1, -2)) * self.M) @ self.v

    def readout_t(self, do):
        """`S_t do_t`, the gradient of `Σ do·readout(x)` with respect to x."""
        return self.decay * (do @ self.S.transpose(-1, -2)) + ((do @ self.v.transpose(-1, -2)) * self.M) @ self.k

    def unchunk(self, x):
        """`[B, H, NT, C, ...]` back to `[B, T, H, ...]`."""
        x = x.movedim(1, 3)
        return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :self.T]


def naive_chunk_mesa_fwd(
    q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, chunk_size, flag_unconverged=False
):
    """
    Chunkwise forward on `[B, T, H, ...]` tensors of the compute dtype: `(o, x, steps, final_state)` (steps `~n`
    where a token did not reach `cg_tol`, with `flag_unconverged`).
    """
    pieces = ChunkPieces(k, v, g, beta, lamb, initial_state, chunk_size)
    b = pieces.chunk(q)
    if cg_max_steps == 0:
        x, steps = b, torch.zeros(b.shape[:-1], dtype=torch.int32, device=b.device)
    else:
        x, steps = cg_solve(pieces.matvec, b, pieces.diag, cg_max_steps, cg_tol, pieces.preconditioner(precondition),
                            flag_unconverged=flag_unconverged)
    o = pieces.readout(x)
    return pieces.unchunk(o), pieces.unchunk(x), pieces.unchunk(steps), pieces.final_state


def naive_chunk_mesa_bwd(
    x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, chunk_size, solve=None
):
    r"""
    The implicit backward, chunkwise: the adjoint solve `e_t = A_t⁻¹ S_t do_t` with the forward's solver, then
    autograd of the surrogate `L̃ = Σ do·o − Σ e·A x + <dht, final_state>` with x and e held fixed.
    `solve`, if given, maps `dx [B, T, H, K]` to `e` in place of the PyTorch CG (the Triton path passes its kernel).
    Returns `(dq, dk, dv, dg, dbeta, dlamb, dh0)`.
    """
    leaves = [t.detach().requires_grad_() for t in (k, v, g, beta, lamb)]
    h0 = None if initial_state is None else [h.detach().requires_grad_() for h in initial_state]
    with torch.enable_grad():
        pieces = ChunkPieces(*leaves, h0, chunk_size)
        xc, doc = pieces.chunk(x), pieces.chunk(do)
        with torch.no_grad():
            dx = pieces.readout_t(doc)
            if cg_max_steps == 0:
                e = dx
            elif solve is not None:
                e = pieces.chunk(solve(pieces.unchunk(dx)))
            else:
                e, _ = cg_solve(pieces.matvec, dx, pieces.diag, cg_max_steps, cg_tol, pieces.preconditioner(precondition))
        loss = (pieces.readout(xc) * doc).sum()
        if cg_max_steps > 0:
            loss = loss - (pieces.matvec(xc) * e).sum()
        if dht is not None:
            loss = loss + sum((h * dh).sum() for h, dh in zip(pieces.final_state, dht) if dh is not None)
        inputs = leaves + (h0 or [])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    dk, dv, dg, dbeta, dlamb = grads[:5]
    dh0 = tuple(grads[5:]) if h0 is not None else None
    return pieces.unchunk(e), dk, dv, dg, dbeta, dlamb, dh0


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
    Chunkwise-parallel Mesa forward in PyTorch: the algorithm of the Triton chunk kernels.
    Returns `(o, final_state)`, plus `cg_steps [B, T, H]` when `return_cg_steps` (`~n` where a token did not reach
    `cg_tol`, with `flag_unconverged`).
    """
    dtype = compute_dtype(q)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.to(dtype)), l2norm(k.to(dtype))
    out_dtype = v.dtype
    q, k, v, g, beta, lamb = (x.to(dtype) for x in (q, k, v, g, beta, lamb))
    if cu_seqlens is not None:
        q, k, v, g, beta = (pad_varlen(x, cu_seqlens) for x in (q, k, v, g, beta))
    o, _, steps, final = naive_chunk_mesa_fwd(
        q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, chunk_size, flag_unconverged
    )
    if cu_seqlens is not None:
        o, steps = unpad_varlen(o, cu_seqlens), unpad_varlen(steps, cu_seqlens)
    final = final if output_final_state else None
    return (o.to(out_dtype), final, steps) if return_cg_steps else (o.to(out_dtype), final)
