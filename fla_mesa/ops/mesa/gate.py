# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The Mesa layer's gates from their projections, fused: `β = σ(b)` and `log γ = log σ(a)`, with the paper's cap
`γ ← γ (1 - (1 - gamma_cap) β²)` in log space. One kernel forward and one backward instead of about ten elementwise
ops each: in an eager training step every launch is host time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fla.utils import autocast_custom_bwd, autocast_custom_fwd, input_guard

from fla_mesa.ops.mesa.kernel_utils import round_code, round_to

BLOCK = 1024


def naive_mesa_gate(a: torch.Tensor, b: torch.Tensor, gamma_cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log γ, β)` in float32, in PyTorch: the reference of `fused_mesa_gate`, and the layer's path without Triton."""
    beta = b.float().sigmoid()
    g = F.logsigmoid(a.float())
    if gamma_cap is not None:
        g = g + torch.log1p(-(1 - gamma_cap) * beta * beta)
    return g, beta


@triton.jit
def _log1p(x):
    # log(1 + x) to a few ulps for small x too (libdevice's log1p has no interpreter twin): the log of the rounded
    # 1 + x, scaled by how far that rounding moved it
    u = 1. + x
    d = u - 1.
    return tl.where(d == 0., x, tl.log(u) * (x / tl.where(d == 0., 1., d)))


@triton.jit
def _sigmoid(x):
    return 1. / (1. + tl.exp(-x))


@triton.jit(do_not_specialize=['N'])
def mesa_gate_fwd_kernel(a, b, g, beta, N, C, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_a = tl.load(a + o, mask=m, other=0.).to(tl.float32)
    b_beta = _sigmoid(tl.load(b + o, mask=m, other=0.).to(tl.float32))
    # log σ(a) = min(a, 0) - log(1 + e^{-|a|}), exact for large |a| of either sign
    b_g = tl.minimum(b_a, 0.) - _log1p(tl.exp(-tl.abs(b_a)))
    if HAS_CAP:
        b_g += _log1p(-C * b_beta * b_beta)
    tl.store(g + o, b_g, mask=m)
    tl.store(beta + o, b_beta, mask=m)


@triton.jit(do_not_specialize=['N'])
def mesa_gate_bwd_kernel(
    a, beta, dg, dbeta, da, db, N, C, HAS_CAP: tl.constexpr, DA_ROUND: tl.constexpr, DB_ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_a = tl.load(a + o, mask=m, other=0.).to(tl.float32)
    b_beta = tl.load(beta + o, mask=m, other=0.)
    b_dg = tl.load(dg + o, mask=m, other=0.)
    b_dbeta = tl.load(dbeta + o, mask=m, other=0.)
    # d log σ(a) / da = σ(-a)
    b_da = b_dg * _sigmoid(-b_a)
    if HAS_CAP:
        b_dbeta += b_dg * (-2. * C * b_beta / (1. - C * b_beta * b_beta))
    b_db = b_dbeta * (1. - b_beta) * b_beta
    # rounded to nearest before a 16-bit store: the interpreter's bf16 cast truncates
    tl.store(da + o, round_to(b_da, DA_ROUND).to(da.dtype.element_ty), mask=m)
    tl.store(db + o, round_to(b_db, DB_ROUND).to(db.dtype.element_ty), mask=m)


def _grad_buffer(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the kernel stores bf16, fp16 (both rounded) and float32 gradients itself; other dtypes get a float32 one cast
    # after it (the kernel computes in float32)
    native = dtype in (torch.bfloat16, torch.float16, torch.float32)
    return torch.empty_like(like, dtype=dtype if native else torch.float32)


class MesaGateFunction(torch.autograd.Function):

    @staticmethod
    @input_guard
    @autocast_custom_fwd
    def forward(ctx, a, b, gamma_cap):
        N = a.numel()
        g = torch.empty_like(a, dtype=torch.float32)
        beta = torch.empty_like(b, dtype=torch.float32)
        C = 0. if gamma_cap is None else 1. - gamma_cap
        mesa_gate_fwd_kernel[(triton.cdiv(N, BLOCK),)](a, b, g, beta, N, C, HAS_CAP=gamma_cap is not None, BLOCK=BLOCK)
        # β, not b: the op keeps β anyway, and σ'(b) = β (1 - β)
        ctx.save_for_backward(a, beta)
        ctx.C, ctx.has_cap, ctx.b_dtype = C, gamma_cap is not None, b.dtype
        return g, beta

    @staticmethod
    @input_guard
    @autocast_custom_bwd
    def backward(ctx, dg, dbeta):
        a, beta = ctx.saved_tensors
        N = a.numel()
        da, db = _grad_buffer(a, a.dtype), _grad_buffer(a, ctx.b_dtype)
        mesa_gate_bwd_kernel[(triton.cdiv(N, BLOCK),)](
            a, beta, dg, dbeta, da, db, N, ctx.C, HAS_CAP=ctx.has_cap,
            DA_ROUND=round_code(da.dtype), DB_ROUND=round_code(db.dtype), BLOCK=BLOCK,
        )
        return da.to(a.dtype), db.to(ctx.b_dtype), None


@torch.compiler.disable
def fused_mesa_gate(
    a: torch.Tensor, b: torch.Tensor, gamma_cap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The Mesa layer's gates, fused: `β = σ(b)` and `g = log γ = log σ(a)`, with `gamma_cap` (`b` of the paper's cap)
    `g = log σ(a) + log(1 - (1 - gamma_cap) β²)`.

    Args:
        a (torch.Tensor):
            the γ gate's pre-activations, e.g. `[B, T, H]`.
        b (torch.Tensor):
            the β gate's pre-activations, the shape of `a`.
        gamma_cap (float, Optional):
            the cap's `b`, in (0, 1]; `None` leaves γ uncapped. Default: `None`.

    Returns:
        g (torch.Tensor): `log γ`, float32, the shape of `a`.
        beta (torch.Tensor): `β`, float32, the shape of `a`.
    """
    for name, x in (('a', a), ('b', b)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if a.shape != b.shape:
        raise ValueError(f"`a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if gamma_cap is not None and (isinstance(gamma_cap, bool) or not (isinstance(gamma_cap, (int, float))
                                                                   and 0 < gamma_cap <= 1)):
        raise ValueError(f"`gamma_cap` must be None or a float in (0, 1], got {gamma_cap!r}")
    return MesaGateFunction.apply(a, b, None if gamma_cap is None else float(gamma_cap))
