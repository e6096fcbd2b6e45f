# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
`fused_mesa_gate` (the layer's γ and β gates, one kernel forward and one backward) against the paper's formula in
float64, `log(σ(a) (1 - (1 - cap) σ(b)²))` and `σ(b)`: outputs and both gradients, FlashAttention's rule against
`naive_mesa_gate` in float32; for bf16 and fp16 inputs the gradients (stored in that dtype) within their rounding
to it of the float64 result plus that rule. Legal extremes (±inf) give exact answers.
"""

import pytest
import torch

from fla_mesa.ops.mesa.gate import fused_mesa_gate, naive_mesa_gate
from tests.utils import NEEDS_TRITON, ON_GPU, assert_rel, fp32_bound, on_triton, rel_err

pytestmark = NEEDS_TRITON
gate = on_triton(fused_mesa_gate)
device = 'cuda' if ON_GPU else 'cpu'


def reference(a, b, gamma_cap):
    a, b = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    beta, gamma = torch.sigmoid(b), torch.sigmoid(a)
    if gamma_cap is not None:
        gamma = gamma * (1 - (1 - gamma_cap) * beta ** 2)
    return (a, b), (gamma.log(), beta)


def outputs_and_grads(fn, a, b, gamma_cap, dg, dbeta):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    if fn is None:
        (a, b), (g, beta) = reference(a, b, gamma_cap)
    else:
        g, beta = fn(a, b, gamma_cap)
    da, db = torch.autograd.grad((g * dg.to(g)).sum() + (beta * dbeta.to(beta)).sum(), [a, b])
    return g, beta, da, db


def inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # 2 x 700 x 3 = 4200: not a multiple of the kernel's block (the masked tail); pre-activations up to far in the
    # tails of both sigmoids (log σ(a) for a = ±88 is 0 and -88 to float32)
    a = torch.randn(2, 700, 3, generator=gen) * 4
    b = torch.randn(2, 700, 3, generator=gen) * 3
    a.view(-1)[:8] = torch.tensor([88., -88., 30., -30., 1e-3, -1e-3, 0., 12.])
    b.view(-1)[:8] = torch.tensor([-30., 30., 0., 1e-3, 88., -88., 5., -5.])
    dg, dbeta = torch.randn(2, 700, 3, generator=gen), torch.randn(2, 700, 3, generator=gen)
    return a.to(dtype), b.to(dtype), dg, dbeta


@pytest.mark.parametrize('gamma_cap', [None, 0.9975, 0.5, 1.0])
# upstream gradients at scale 1e-8 too (fp16 cannot hold gradients that small: its subnormals end at 6e-8)
@pytest.mark.parametrize('dtype, scale', [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float16, 1.0),
                                          (torch.float32, 1e-8), (torch.bfloat16, 1e-8)])
def test_gate_matches_float64(dtype, scale, gamma_cap):
    a, b, dg, dbeta = inputs(dtype)
    dg, dbeta = dg * scale, dbeta * scale
    got = outputs_and_grads(gate, a, b, gamma_cap, dg, dbeta)
    ref = outputs_and_grads(None, a, b, gamma_cap, dg, dbeta)
    base = outputs_and_grads(naive_mesa_gate, a.float(), b.float(), gamma_cap, dg, dbeta)
    for name, x, r, f in zip(['g', 'beta', 'da', 'db'], got, ref, base):
        assert x.dtype == (torch.float32 if name in ('g', 'beta') else dtype), name
        assert x.shape == a.shape, name
        bound = fp32_bound(rel_err(f, r), gpu=ON_GPU)
        if x.dtype in (torch.bfloat16, torch.float16):
            # the gradient's own rounding to its 16-bit dtype
            bound += rel_err(r.to(x.dtype), r)
        err = rel_err(x, r)
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize('gamma_cap', [None, 0.9975])
def test_gate_extremes_exact(gamma_cap):
    inf = float('inf')
    a = torch.tensor([inf, -inf, inf, -inf, 0.])
    b = torch.tensor([inf, -inf, -inf, inf, 0.])
    dg, dbeta = torch.full_like(a, 0.75), torch.full_like(a, -1.5)
    g, beta, da, db = outputs_and_grads(gate, a, b, gamma_cap, dg, dbeta)
    c = 0. if gamma_cap is None else 1 - gamma_cap
    cap = torch.log1p(-c * torch.tensor([1., 0., 0., 1., 0.25], dtype=torch.float64)).float()
    # γ = 1 (a = inf), γ = 0 (a = -inf: log γ = -inf, which chunk_mesa takes), β = 1 or 0
    torch.testing.assert_close(g, torch.tensor([0., -inf, 0., -inf, -0.6931472]) + cap, rtol=2e-7, atol=0)
    assert torch.equal(beta, torch.tensor([1., 0., 0., 1., 0.5]))
    # d log σ(a)/da = σ(-a): 0 at a = inf, 1 at a = -inf; σ'(b) = 0 at b = ±inf
    assert torch.equal(da[:4], torch.tensor([0., 0.75, 0., 0.75]))
    assert torch.equal(db[:4], torch.zeros(4))


def test_gate_keeps_a_and_beta():
    # for its backward the gate keeps a (the layer's bf16 projection) and its own output β, which chunk_mesa keeps
    # anyway: no float32 intermediates
    a, b, _, _ = inputs(torch.bfloat16)
    a, b = a.to(device).requires_grad_(), b.to(device).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        g, beta = fused_mesa_gate(a, b, 0.9975)
    assert len(saved) == 2
    assert saved[0].data_ptr() == a.data_ptr() and saved[1].data_ptr() == beta.data_ptr()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_gate_bias_and_column_views(dtype):
    # as the layer calls it: a and b are column views of one projection's output (rows 11 apart, not at its start),
    # their biases added here (in float32). Against float64 of σ(a + bias) etc.; the other columns get no gradient
    a, b, dg, dbeta = inputs(dtype)
    gen = torch.Generator().manual_seed(3)
    a_bias, b_bias = (torch.randn(3, generator=gen).to(dtype) for _ in range(2))
    y = torch.randn(2, 700, 11, generator=gen).to(dtype)
    y[..., 1:4], y[..., 6:9] = a, b
    y, a_bias, b_bias = (t.to(device).requires_grad_() for t in (y, a_bias, b_bias))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        g, beta = fused_mesa_gate(y[..., 1:4], y[..., 6:9], 0.9975, a_bias, b_bias)
    # a is kept as the view it is (no copy): its storage is y's
    assert saved[0].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    dy, da_bias, db_bias = torch.autograd.grad((g * dg.to(g)).sum() + (beta * dbeta.to(beta)).sum(),
                                               [y, a_bias, b_bias])
    a64, b64 = a.double() + a_bias.detach().cpu().double(), b.double() + b_bias.detach().cpu().double()
    ref = outputs_and_grads(None, a64, b64, 0.9975, dg, dbeta)
    # the float32 reference's error with the biases added as the kernel adds them (in float32)
    base = [x.double() for x in outputs_and_grads(lambda u, v, c: naive_mesa_gate(u, v, c, a_bias.detach().cpu(),
                                                                                  b_bias.detach().cpu()),
                                                  a.float(), b.float(), 0.9975, dg, dbeta)]
    dy = dy.cpu()
    got = [g, beta, dy[..., 1:4], dy[..., 6:9]]
    for name, x, r, f in zip(['g', 'beta', 'da', 'db'], got, ref, base):
        bound = fp32_bound(rel_err(f, r), gpu=ON_GPU)
        if x.dtype == torch.bfloat16:
            bound += rel_err(r.to(x.dtype), r)
        err = rel_err(x, r)
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"
    # the biases' gradients: the sums over rows of the gradients of a and b as stored (nn.Linear's bias gets the sum
    # of its output's gradient), off by a float32 sum's error (at most ~log2(n) ulps of the sum of magnitudes, in any
    # order) and their rounding to the biases' dtype
    for name, d, col in (('a_bias', da_bias, dy[..., 1:4]), ('b_bias', db_bias, dy[..., 6:9])):
        assert d.dtype == dtype, name
        want = col.double().sum((0, 1))
        slack = 1e-5 * col.double().abs().sum((0, 1)).norm().item() / want.norm().item()
        assert_rel(name, d.cpu(), want, slack + rel_err(want.to(dtype), want))
    assert torch.all(dy[..., [0, 4, 5, 9, 10]] == 0)


@pytest.mark.parametrize('a, b, gamma_cap, error, match', [
    (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3), None, TypeError, '`a`'),
    (torch.zeros(2, 3), 1.0, None, TypeError, '`b`'),
    (torch.zeros(2, 3), torch.zeros(3, 2), None, ValueError, r'\(2, 3\) and \(3, 2\)'),
    (torch.zeros(2, 3), torch.zeros(2, 3), 0.0, ValueError, 'gamma_cap'),
    (torch.zeros(2, 3), torch.zeros(2, 3), 1.5, ValueError, 'gamma_cap'),
    (torch.zeros(2, 3), torch.zeros(2, 3), True, ValueError, 'gamma_cap'),
    (torch.zeros(2, 3), torch.zeros(2, 3), (None, torch.zeros(2)), ValueError, r'`a_bias` must have shape \(3,\)'),
    (torch.zeros(2, 3), torch.zeros(2, 3), (None, None, torch.zeros(3, dtype=torch.int64)), TypeError, '`b_bias`'),
])
def test_gate_bad_inputs(a, b, gamma_cap, error, match):
    args = gamma_cap if isinstance(gamma_cap, tuple) else (gamma_cap,)
    with pytest.raises(error, match=match):
        fused_mesa_gate(a, b, *args)


# both kernels compiled for sm_90 on any machine (tests/sm90.py: Triton's own ptxas, no GPU), bf16 in and out
_SM90_SCRIPT = """
from tests.sm90 import compile_sm90
from fla_mesa.ops.mesa import gate
kernels = [
    compile_sm90(gate.mesa_gate_fwd_kernel, dict(a='*bf16', b='*bf16', a_bias='*bf16', b_bias='*bf16', g='*fp32',
                                                 beta='*fp32', N='i32', SA='i32', SB='i32', C='fp32'),
                 dict(H=8, HAS_CAP=True, HAS_A_BIAS=True, HAS_B_BIAS=True, BLOCK=gate.BLOCK), num_warps=4,
                 num_stages=1),
    compile_sm90(gate.mesa_gate_bwd_kernel, dict(a='*bf16', a_bias='*bf16', beta='*fp32', dg='*fp32', dbeta='*fp32',
                                                 da='*bf16', db='*bf16', N='i32', SA='i32', C='fp32'),
                 dict(H=8, HAS_CAP=True, HAS_A_BIAS=True, DA_ROUND=1, DB_ROUND=1, BLOCK=gate.BLOCK), num_warps=4,
                 num_stages=1),
]
print(' '.join(str(len(k.asm['cubin'])) for k in kernels))
"""


def test_gate_kernels_compile_for_sm90():
    from tests.sm90 import run_apart
    out = run_apart(_SM90_SCRIPT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(int(n) > 0 for n in out.stdout.split()) and len(out.stdout.split()) == 2
