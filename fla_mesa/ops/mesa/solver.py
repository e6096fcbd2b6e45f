# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The project's conjugate gradient solver in PyTorch (README.md, "The solver")."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fla_mesa.ops.mesa.utils import residual_floor2


def cg_solve(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    diag: torch.Tensor,
    max_steps: int,
    tol: float | None = None,
    precondition: bool | Callable[[torch.Tensor], torch.Tensor] = False,
    round_p: Callable[[torch.Tensor], torch.Tensor] | None = None,
    flag_unconverged: bool = False,
    x0: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Solves `A x = b` row by row for a batch of SPD systems given only `matvec(p) = A p`.

    Args:
        matvec (Callable):
            Maps `p [..., K]` to `A p [..., K]`, each row with its own matrix.
        b (torch.Tensor):
            Right-hand sides `[..., K]`.
        diag (torch.Tensor):
            `diag(A)` `[..., K]`, positive; gives the Jacobi start `x0 = b / diag` and the preconditioner.
        max_steps (int):
            At most this many iterations; 0 returns the Jacobi start.
        tol (float, Optional):
            A row stops once `||r|| <= tol * ||b||`. `None` runs every row for `max_steps` steps, unless
            `||r||² <= residual_floor2(dtype) · ||b||²` (9e-10 relative in float32) stops it first.
        precondition (bool or Callable):
            `True`: Jacobi-preconditioned CG (`z = r / diag`); a callable maps `r [..., K]` to `z = M⁻¹ r` for an SPD
            `M` of its own (the chunk preconditioner: `chunk_torch.ChunkPieces.chunk_start_preconditioner`); `False`:
            plain CG. The start is the Jacobi one (`b / diag`) in every case. Default: `False`.
        round_p (Callable, Optional):
            Rounded directions, as the chunk kernel's `round_directions` (op README): the start and each direction
            rounded by it before the matvec, x and r moved along the rounded vector, α = rᵀp / pᵀAp. Default: `None`.
        flag_unconverged (bool):
            With `tol`, a row that stops with `||r|| > tol * ||b||` (at `max_steps`, or at a breakdown: pᵀAp or rᵀz
            not positive), or whose b is not finite, returns `~steps` (= -steps - 1; `utils.split_cg_steps` decodes).
            Default: `False`.
        x0 (torch.Tensor, Optional): the start `[..., K]` instead of the Jacobi one (non-finite entries start at 0).
        rows (torch.Tensor, Optional): bool `[...]`: only these rows iterate; the others return `x0` (or the Jacobi
            start) in 0 steps. Default: all.

    Returns:
        x (torch.Tensor): `[..., K]`, the solution.
        steps (torch.Tensor): `[...]` int32, iterations each row ran (`~steps` where flagged, see `flag_unconverged`).
    """
    # normalise each right-hand side: results and step counts do not depend on the scale of b
    s = b.norm(dim=-1, keepdim=True)
    nonzero = s > 0
    b = b / torch.where(nonzero, s, torch.ones_like(s))
    tol2 = max(0.0 if tol is None else float(tol) ** 2, residual_floor2(b.dtype))

    # the reciprocal once: a multiply per step instead of a division (the kernels do the same, for speed; the same
    # rounding keeps their step counts equal to this reference)
    dinv = 1 / diag
    if not (callable(precondition) or isinstance(precondition, bool)):
        raise ValueError(f"`precondition` must be a bool or a callable here, got {precondition!r}")
    if callable(precondition):
        apply_m = precondition
    elif precondition:
        def apply_m(r):
            return r * dinv
    else:
        def apply_m(r):
            return r
    if x0 is None:
        x = b * dinv
    else:
        x = x0 / torch.where(nonzero, s, torch.ones_like(s))
        x = torch.where(x.isfinite(), x, torch.zeros_like(x))
    if round_p is not None:
        x = round_p(x)
    r = b - matvec(x)
    z = apply_m(r)
    p = z
    rz = (r * z).sum(-1, keepdim=True)
    active = nonzero & ((r * r).sum(-1, keepdim=True) > tol2) & (rz > 0)
    if rows is not None:
        active = active & rows[..., None]
    steps = torch.zeros_like(s, dtype=torch.int32)
    for _ in range(max_steps):
        if not active.any():
            break
        if round_p is not None:
            p = round_p(p)
        w = matvec(p)
        pw = (p * w).sum(-1, keepdim=True)
        # exact zeros are the only guard: no absolute epsilon. A curvature pᵀw <= 0 (in float32: an underflow past
        # convergence, before rᵀz's) stops the row here, unchanged and not counted; kept active with α = 0 it would
        # grow p = z + p without bound
        active = active & (pw > 0)
        # rᵀz = rᵀp only for unrounded directions; rᵀp is the exact line search along the rounded one
        rp = rz if round_p is None else (r * p).sum(-1, keepdim=True)
        alpha = torch.where(active, rp / torch.where(active, pw, torch.ones_like(pw)), torch.zeros_like(pw))
        x = x + alpha * p
        r = r - alpha * w
        z = apply_m(r)
        rz_new = (r * z).sum(-1, keepdim=True)
        ratio = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + ratio * p
        rz = torch.where(active, rz_new, rz)
        steps += active.to(torch.int32)
        # rᵀz can underflow to 0 before rᵀr does: a row stops there too, before 0/0 reaches p
        active = active & ((r * r).sum(-1, keepdim=True) > tol2) & (rz > 0)
    if flag_unconverged and tol is not None:
        # not (≤) rather than >: a NaN residual is flagged too; an all-zero b is solved exactly
        unconverged = (s != 0) & ~((r * r).sum(-1, keepdim=True) <= tol2)
        if rows is not None:
            unconverged = unconverged & rows[..., None]
        steps = torch.where(unconverged, ~steps, steps)
    return x * s, steps.squeeze(-1)
