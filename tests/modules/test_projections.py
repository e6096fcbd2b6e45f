# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
`fused_linears` (several bias-free projections of one input as one GEMM) against the same projections made
separately: outputs, the input's and every weight's gradient, what its backward keeps, and bad inputs. Also the Mesa
layer's use of it: in training on plain projections, not where a projection has a hook, nor without gradients.
"""

import pytest
import torch
import torch.nn.functional as F

from fla_mesa.layers import mesa_net as mesa_net_module
from fla_mesa.modules import fused_linears
from tests.layers.test_mesa_net_layer import inputs, make_layer
from tests.utils import assert_rel, rel_err

device = 'cuda' if torch.cuda.is_available() else 'cpu'


def outputs_and_grads(fn, x, weights, dys):
    x, weights = x.detach().requires_grad_(), [w.detach().requires_grad_() for w in weights]
    ys = fn(x, weights)
    grads = torch.autograd.grad(ys, [x, *weights], dys)
    return [*ys, *grads]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_linears_match_separate(dtype):
    # widths of q, k, v and two per-head gates; against float64 of the separate projections, within the separate
    # projections' own error in this dtype (a GEMM's sums in another order) plus that dtype's rounding
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 48, generator=gen)
    weights = [torch.randn(n, 48, generator=gen) / 7 for n in (32, 32, 24, 3, 3)]
    dys = [torch.randn(2, 37, n, generator=gen) for n in (32, 32, 24, 3, 3)]
    ref = outputs_and_grads(lambda x, ws: [F.linear(x, w) for w in ws], x.double(), [w.double() for w in weights],
                            [d.double() for d in dys])
    cast = [t.to(device, dtype) for t in (x, *weights, *dys)]
    x, weights, dys = cast[0], cast[1:6], cast[6:]
    sep = outputs_and_grads(lambda x, ws: [F.linear(x, w) for w in ws], x, weights, dys)
    got = outputs_and_grads(fused_linears, x, weights, dys)
    names = [f'y{i}' for i in range(5)] + ['dx'] + [f'dw{i}' for i in range(5)]
    for name, g, s, r in zip(names, got, sep, ref):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_rel(name, g, r, 2 * rel_err(s, r) + (1e-6 if dtype == torch.float32 else 8e-3))
    # the outputs are column views of one tensor
    ys = fused_linears(x, weights)
    assert len({y.untyped_storage().data_ptr() for y in ys}) == 1


def test_fused_linears_keep_no_concatenated_weight():
    # the backward keeps x and the weights themselves: no copy of the weights (a parameter costs no activation memory)
    x = torch.randn(4, 8, 16, device=device, requires_grad=True)
    weights = [torch.randn(n, 16, device=device, requires_grad=True) for n in (8, 8, 2)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_linears(x, weights)
    assert {t.untyped_storage().data_ptr() for t in saved} == {t.untyped_storage().data_ptr() for t in (x, *weights)}


@pytest.mark.parametrize('weights, match', [
    ([], 'at least one'),
    ([torch.zeros(4, 16), torch.zeros(4, 15)], r'`weights\[1\]` must have shape \[out, 16\].*\(4, 15\)'),
    ([torch.zeros(16)], r'`weights\[0\]`'),
])
def test_fused_linears_bad_inputs(weights, match):
    with pytest.raises(ValueError, match=match):
        fused_linears(torch.zeros(2, 16), weights)


def test_layer_projections_one_gemm_in_training(monkeypatch):
    # in training the layer's q, k, a, b projections (and v, on its way to a conv) are one fused_linears call; with a
    # hook on a projection, or without gradients, each module is called (its hook runs)
    calls = []
    real = mesa_net_module.fused_linears
    monkeypatch.setattr(mesa_net_module, 'fused_linears', lambda x, ws: (calls.append(len(ws)), real(x, ws))[1])
    for kwargs, fused in ((dict(), 4), (dict(use_v_conv=True), 5)):
        layer = make_layer(**kwargs).train()
        x = inputs()
        calls.clear()
        layer(x)
        assert calls == [fused]
        hooked = []
        handle = layer.k_proj.register_forward_hook(lambda m, a, out: hooked.append(1))
        layer(x)
        handle.remove()
        assert calls == [fused] and hooked == [1]
        with torch.no_grad():
            layer(x)
        assert calls == [fused]


def test_fused_linears_under_autocast():
    # float32 x and weights under a bf16 autocast (on the CPU its backward runs outside it): bf16 outputs, float32
    # gradients, as the separate projections under the same autocast give them (up to their sums' order)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 20, 32, generator=gen)
    weights = [torch.randn(n, 32, generator=gen) / 6 for n in (16, 16, 2)]
    dys = [torch.randn(3, 20, n, generator=gen) for n in (16, 16, 2)]
    x, weights, dys = x.to(device), [w.to(device) for w in weights], [d.to(device, torch.bfloat16) for d in dys]
    results = []
    for fn in (lambda x, ws: [F.linear(x, w) for w in ws], fused_linears):
        xg, ws = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in weights]
        with torch.autocast(device, dtype=torch.bfloat16):
            ys = fn(xg, ws)
        # the backward outside the autocast, as a training loop calls it
        results.append([*ys, *torch.autograd.grad(ys, [xg, *ws], dys)])
    sep, got = results
    for i, (g, s) in enumerate(zip(got, sep)):
        assert g.dtype == s.dtype == (torch.bfloat16 if i < 3 else torch.float32), i
        assert_rel(f'tensor {i}', g.float(), s.float(), 8e-3)
