# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The PyTorch chunk path (CPU tensors, float64, and K > 128): the chunkwise form of one call in torch ops, the forward
solve and readout, and the implicit backward by autograd of its surrogate (README "Backward: implicit
differentiation").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fla_mesa.ops.mesa.precond import JACOBI_STALL_FF2, apply_factor, chunk_start_factor, jacobi_stall_score
from fla_mesa.ops.mesa.solver import cg_solve
from fla_mesa.ops.mesa.utils import compute_dtype, min_log_decay, pad_varlen, unpad_varlen, zero_state


def _product_error(a, b, p):
    """`a b − p` exactly, for `p` the rounded product `a * b` (Dekker's product with Veltkamp's split: torch has no
    fma); the rounding error of a product is a number of the dtype, so nothing is lost."""
    # Veltkamp's splitter 2^ceil(t/2) + 1, t the dtype's significand bits (4097 in float32, 2^27 + 1 in float64)
    f = 2.0 ** ((round(-math.log2(torch.finfo(p.dtype).eps)) + 2) // 2) + 1

    def split(x):
        c = f * x
        hi = c - (c - x)
        return hi, x - hi

    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    return ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def decay_add(h, lo, d, delta):
    """
    `d (h + lo) + delta` as a new pair `(h, lo)`: a running state carried at about twice the dtype's precision, the
    Triton state pass's `chunk_h._decay_add` (op README, "Compensated state passes"). `h` is the number of the dtype
    nearest the pair, `lo` the part it leaves out. Autograd sees `h ← d h + delta` plus a constant: `lo` is rounding
    error, no function of the inputs.
    """
    p = d * h
    with torch.no_grad():
        lo = _product_error(h, d, p) + lo * d
    y = delta + lo
    h = p + y
    with torch.no_grad():
        # TwoSum: h + lo == p + y exactly
        z = h - p
        lo = (p - (h - z)) + (y - z)
    return h, lo


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
            h_kk, h_kv = zero_state(B, H, K, V, k.dtype, k.device)
        else:
            h_kk, h_kv = (h.to(k.dtype) for h in initial_state)
        w = (gc[..., -1:] - gc).exp() * beta
        kw = k * w[..., None]
        Hs, Ss = [], []
        # the running states carried compensated, as the Triton state pass does (`decay_add`)
        lo_kk, lo_kv = torch.zeros_like(h_kk), torch.zeros_like(h_kv)
        for i in range(NT):
            Hs.append(h_kk)
            Ss.append(h_kv)
            d = gc[:, :, i, -1, None, None].exp()
            h_kk, lo_kk = decay_add(h_kk, lo_kk, d, kw[:, :, i].transpose(-1, -2) @ k[:, :, i])
            h_kv, lo_kv = decay_add(h_kv, lo_kv, d, kw[:, :, i].transpose(-1, -2) @ v[:, :, i])
        self.H, self.S = torch.stack(Hs, 2), torch.stack(Ss, 2)
        self.final_state = (h_kk, h_kv)
        self.diag = self.decay * torch.diagonal(self.H, dim1=-2, dim2=-1)[..., None, :] + self.M @ k.pow(2) + self.lamb

    def chunk_start_preconditioner(self):
        """
        `z = M_c⁻¹ r` for every token of chunk c, `M_c = (H_c + H_{c+1}) / 2 + Λ` (op README, "Chunk
        preconditioner"), as `(r W) Wᵀ` with the factor `W` of `precond.chunk_start_factor` that the Triton path uses
        too. Rounding in `W` changes step counts, never what CG converges to.
        """
        w = chunk_start_factor(*self.chunk_start(), self.k.dtype)
        return lambda r: apply_factor(r, w)

    def end_states(self):
        """`H_{c+1}`, the state after every chunk (the next chunk's start, the final state after the last), detached."""
        return torch.cat([self.H.detach()[:, :, 1:], self.final_state[0].detach()[:, :, None]], 2)

    def chunk_start(self):
        """`(H_c + H_{c+1}, 1/2, λ)` of every chunk's `M_c`, `H_{c+1}` the state after the chunk; detached."""
        h = self.H.detach()
        return h + self.end_states(), torch.full_like(h[..., 0, 0], 0.5), self.lamb[:, :, 0].detach()

    def stall_score(self):
        """
        'auto''s `precond.jacobi_stall_score` of every chunk, `[B, H, NT]`: of `a_c (H_c + H_{c+1}) / 2 + Λ`, `a_c`
        the decay from the chunk's start to its middle token, so that a state that fades within its chunk (short
        memory: each token sees mostly its own recent keys, which Jacobi handles) is left to Jacobi.
        """
        h, half, lamb = self.chunk_start()
        return jacobi_stall_score(h, half * self.decay[..., self.decay.shape[-2] // 2, 0].detach(), lamb)

    def preconditioner(self, precondition):
        """What `cg_solve` takes for the op's `precondition`: `True`, `False`, or 'chunk'."""
        if precondition == 'chunk':
            return self.chunk_start_preconditioner()
        return bool(precondition)

    def solve(self, b, max_steps, tol, precondition, flag_unconverged, skip_jacobi=None):
        """
        `cg_solve` for the op's `precondition`; 'auto' is Jacobi, then the chunk preconditioner for the rows
        Jacobi leaves above `tol`, from its iterate (steps count both), as the Triton path's rescue pass. The chunks
        of `skip_jacobi` (`[B, H, NT]` bool), and those where `precond.jacobi_stall_score` predicts a Jacobi stall,
        skip the Jacobi pass: all their rows go to the second, from the Jacobi start. Returns `(x, steps, rescued)`,
        `rescued` `[B, H, NT]` bool: the chunks the second pass solved ('auto' only, else `None`).
        """
        if precondition != 'auto' or tol is None or max_steps == 0:
            if skip_jacobi is not None:
                raise ValueError("`skip_jacobi` is for precondition='auto' with cg_tol and cg_max_steps > 0")
            precondition = True if precondition == 'auto' else precondition
            return (*cg_solve(self.matvec, b, self.diag, max_steps, tol, self.preconditioner(precondition),
                              flag_unconverged=flag_unconverged), None)
        stall = self.stall_score() > JACOBI_STALL_FF2
        skip = (stall if skip_jacobi is None else stall | skip_jacobi)[..., None].expand(b.shape[:-1])
        x, steps = cg_solve(self.matvec, b, self.diag, max_steps, tol, True, flag_unconverged=True, rows=~skip)
        redo = (steps < 0) | skip
        if not redo.any():
            return x, steps, redo.any(-1)
        x, more = cg_solve(self.matvec, b, self.diag, max_steps, tol, self.chunk_start_preconditioner(),
                           flag_unconverged=flag_unconverged, x0=x, rows=redo)
        # the sum of both passes, its sign the last pass's flag
        total = torch.where(steps < 0, ~steps, steps) + torch.where(more < 0, ~more, more)
        return x, torch.where(more < 0, ~total, total), redo.any(-1)

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


def chunk_mesa_fwd_torch(
    q, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size, flag_unconverged=False
):
    """
    The chunkwise forward in the compute dtype (`utils.compute_dtype`): `(o, x, steps, final_state, rescued)`, steps
    `~n` where a token did not reach `cg_tol`, with `flag_unconverged`; `rescued`, `ChunkPieces.solve`'s, goes to
    the backward.
    """
    dtype = compute_dtype(q)
    q, k, v, g, beta, lamb = (x.to(dtype) for x in (q, k, v, g, beta, lamb))
    if cu_seqlens is not None:
        q, k, v, g, beta = (pad_varlen(x, cu_seqlens) for x in (q, k, v, g, beta))
    pieces = ChunkPieces(k, v, g, beta, lamb, initial_state, chunk_size)
    b = pieces.chunk(q)
    rescued = None
    if cg_max_steps == 0:
        x, steps = b, torch.zeros(b.shape[:-1], dtype=torch.int32, device=b.device)
    else:
        x, steps, rescued = pieces.solve(b, cg_max_steps, cg_tol, precondition, flag_unconverged)
    o, x, steps = pieces.unchunk(pieces.readout(x)), pieces.unchunk(x), pieces.unchunk(steps)
    if cu_seqlens is not None:
        o, x, steps = (unpad_varlen(t, cu_seqlens) for t in (o, x, steps))
    return o, x, steps, pieces.final_state, rescued


def chunk_mesa_bwd_torch(
    x, do, dht, k, v, g, beta, lamb, initial_state, cg_max_steps, cg_tol, precondition, cu_seqlens, chunk_size,
    flag_unconverged=False, rescued=None
):
    r"""
    The implicit backward, chunkwise: the adjoint solve `e_t = A_t⁻¹ S_t do_t` with the forward's solver, then
    autograd of the surrogate `L̃ = Σ do·o − Σ e·A x + <dht, final_state>` with x and e held fixed.
    Returns `(dq, dk, dv, dg, dbeta, dlamb, dh0, steps)`: `steps [B, T, H]` of the adjoint solve (`~n` where a token
    did not reach `cg_tol`, with `flag_unconverged`), `None` without a solve.
    """
    dtype = x.dtype
    k, v, g, beta, lamb, do = (t.to(dtype) for t in (k, v, g, beta, lamb, do))
    if cu_seqlens is not None:
        x, do, k, v, g, beta = (pad_varlen(t, cu_seqlens) for t in (x, do, k, v, g, beta))
    leaves = [t.detach().requires_grad_() for t in (k, v, g, beta, lamb)]
    h0 = None if initial_state is None else [h.detach().requires_grad_() for h in initial_state]
    with torch.enable_grad():
        pieces = ChunkPieces(*leaves, h0, chunk_size)
        xc, doc = pieces.chunk(x), pieces.chunk(do)
        steps = None
        with torch.no_grad():
            dx = pieces.readout_t(doc)
            if cg_max_steps == 0:
                e = dx
            else:
                # the chunks the forward's 'auto' rescued skip Jacobi: the adjoint solve has the same matrices
                e, steps, _ = pieces.solve(dx, cg_max_steps, cg_tol, precondition, flag_unconverged, rescued)
                steps = pieces.unchunk(steps)
        loss = (pieces.readout(xc) * doc).sum()
        if cg_max_steps > 0:
            loss = loss - (pieces.matvec(xc) * e).sum()
        if dht is not None:
            loss = loss + sum((h * dh).sum() for h, dh in zip(pieces.final_state, dht) if dh is not None)
        inputs = leaves + (h0 or [])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    dk, dv, dg, dbeta, dlamb = grads[:5]
    dh0 = tuple(grads[5:]) if h0 is not None else None
    dq = pieces.unchunk(e)
    if cu_seqlens is not None:
        dq, dk, dv, dg, dbeta = (unpad_varlen(t, cu_seqlens) for t in (dq, dk, dv, dg, dbeta))
        steps = None if steps is None else unpad_varlen(steps, cu_seqlens)
    return dq, dk, dv, dg, dbeta, dlamb, dh0, steps
