# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The Mesa layer's gates from their projections, fused: `β = σ(b)` and `log γ = log σ(a)`, with the paper's cap
`γ ← γ (1 - (1 - gamma_cap) β²)` in log space. One kernel forward and one backward instead of about ten elementwise
ops each: in an eager training step every launch is host time. `a` and `b` may be column views of one projection's
output (the layer computes its inputs' projections in one GEMM) and their biases are added here, so that neither is
copied nor kept twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fla.utils import autocast_custom_bwd, autocast_custom_fwd, input_guard

from fla_mesa.ops.mesa.kernel_utils import round_code, round_to

BLOCK = 1024


def naive_mesa_gate(
    a: torch.Tensor,
    b: torch.Tensor,
    gamma_cap: float | None = None,
    a_bias: torch.Tensor | None = None,
    b_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(log γ, β)` in float32, in PyTorch: the reference of `fused_mesa_gate`, and the layer's path without Triton."""
    # the biases added in the projections' dtype, as nn.Linear's bias is (so are their gradients summed)
    a = (a if a_bias is None else a + a_bias).float()
    b = (b if b_bias is None else b + b_bias).float()
    beta = b.sigmoid()
    g = F.logsigmoid(a)
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


@triton.jit
def _load_gate(x, bias, o, m, SX, H: tl.constexpr, HAS_BIAS: tl.constexpr):
    # the pre-activations at the flat `[rows, H]` indices `o`, from rows SX elements apart, plus the bias in float32
    b_x = tl.load(x + (o // H) * SX + o % H, mask=m, other=0.).to(tl.float32)
    if HAS_BIAS:
        b_x += tl.load(bias + o % H, mask=m, other=0.).to(tl.float32)
    return b_x


@triton.jit(do_not_specialize=['N', 'SA', 'SB'])
def mesa_gate_fwd_kernel(
    a, b, a_bias, b_bias, g, beta, N, SA, SB, C, H: tl.constexpr, HAS_CAP: tl.constexpr, HAS_A_BIAS: tl.constexpr,
    HAS_B_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_a = _load_gate(a, a_bias, o, m, SA, H, HAS_A_BIAS)
    b_beta = _sigmoid(_load_gate(b, b_bias, o, m, SB, H, HAS_B_BIAS))
    # log σ(a) = min(a, 0) - log(1 + e^{-|a|}), exact for large |a| of either sign
    b_g = tl.minimum(b_a, 0.) - _log1p(tl.exp(-tl.abs(b_a)))
    if HAS_CAP:
        b_g += _log1p(-C * b_beta * b_beta)
    tl.store(g + o, b_g, mask=m)
    tl.store(beta + o, b_beta, mask=m)


@triton.jit(do_not_specialize=['N', 'SA'])
def mesa_gate_bwd_kernel(
    a, a_bias, beta, dg, dbeta, da, db, N, SA, C, H: tl.constexpr, HAS_CAP: tl.constexpr, HAS_A_BIAS: tl.constexpr,
    DA_ROUND: tl.constexpr, DB_ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_a = _load_gate(a, a_bias, o, m, SA, H, HAS_A_BIAS)
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


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    # `[rows, H]` with unit column stride, a view where one exists (a column slice of a wider output), and its row
    # stride in elements
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()
    return x2, x2.stride(0)


class MesaGateFunction(torch.autograd.Function):

    @staticmethod
    @input_guard(no_guard_contiguous=['a', 'b'])
    @autocast_custom_fwd
    def forward(ctx, a, b, gamma_cap, a_bias, b_bias):
        N = a.numel()
        (a2, sa), (b2, sb) = _rows(a), _rows(b)
        g = torch.empty(a.shape, dtype=torch.float32, device=a.device)
        beta = torch.empty(a.shape, dtype=torch.float32, device=a.device)
        C = 0. if gamma_cap is None else 1. - gamma_cap
        mesa_gate_fwd_kernel[(triton.cdiv(N, BLOCK),)](
            a2, b2, a_bias, b_bias, g, beta, N, sa, sb, C, H=a2.shape[-1], HAS_CAP=gamma_cap is not None,
            HAS_A_BIAS=a_bias is not None, HAS_B_BIAS=b_bias is not None, BLOCK=BLOCK,
        )
        # a as given (a view of the projection's output, which the layer keeps anyway) and β, not b: the op keeps β
        # anyway, and σ'(b) = β (1 - β)
        ctx.save_for_backward(a2, a_bias, beta)
        ctx.C, ctx.has_cap, ctx.a_dtype, ctx.b_dtype = C, gamma_cap is not None, a.dtype, b.dtype
        ctx.bias_dtypes = tuple(None if x is None else x.dtype for x in (a_bias, b_bias))
        return g, beta

    @staticmethod
    @input_guard
    @autocast_custom_bwd
    def backward(ctx, dg, dbeta):
        a2, a_bias, beta = ctx.saved_tensors
        N = beta.numel()
        da, db = _grad_buffer(beta, ctx.a_dtype), _grad_buffer(beta, ctx.b_dtype)
        mesa_gate_bwd_kernel[(triton.cdiv(N, BLOCK),)](
            a2, a_bias, beta, dg, dbeta, da, db, N, a2.stride(0), ctx.C, H=a2.shape[-1], HAS_CAP=ctx.has_cap,
            HAS_A_BIAS=a_bias is not None, DA_ROUND=round_code(da.dtype), DB_ROUND=round_code(db.dtype), BLOCK=BLOCK,
        )
        da, db = da.to(ctx.a_dtype), db.to(ctx.b_dtype)
        # a bias's gradient: the sum over rows of the gate's, as stored in the gate's dtype (what nn.Linear's backward
        # gives its bias: the sum of its output's gradient), in float32
        d_biases = [d.reshape(-1, d.shape[-1]).sum(0, dtype=torch.float32).to(dtype) if need else None
                    for need, d, dtype in zip(ctx.needs_input_grad[3:5], (da, db), ctx.bias_dtypes)]
        return da, db, None, *d_biases


@torch.compiler.disable
def fused_mesa_gate(
    a: torch.Tensor,
    b: torch.Tensor,
    gamma_cap: float | None = None,
    a_bias: torch.Tensor | None = None,
    b_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The Mesa layer's gates, fused: `β = σ(b)` and `g = log γ = log σ(a)`, with `gamma_cap` (`b` of the paper's cap)
    `g = log σ(a) + log(1 - (1 - gamma_cap) β²)`.

    Args:
        a (torch.Tensor):
            the γ gate's pre-activations, e.g. `[B, T, H]`; a view whose rows are apart in memory (columns of a wider
            projection's output) is read in place.
        b (torch.Tensor):
            the β gate's pre-activations, the shape of `a`; likewise.
        gamma_cap (float, Optional):
            the cap's `b`, in (0, 1]; `None` leaves γ uncapped. Default: `None`.
        a_bias (torch.Tensor, Optional):
            `[H]`, added to `a` (in float32) before the gate: the projection's bias. Default: `None`.
        b_bias (torch.Tensor, Optional):
            `[H]`, added to `b` likewise. Default: `None`.

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
    for name, x in (('a_bias', a_bias), ('b_bias', b_bias)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"`{name}` must be None or a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.shape != a.shape[-1:]:
            raise ValueError(f"`{name}` must have shape {tuple(a.shape[-1:])} (a's last dimension), got {tuple(x.shape)}")
    return MesaGateFunction.apply(a, b, None if gamma_cap is None else float(gamma_cap), a_bias, b_bias)
