# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The MesaNet layer on its Triton path under TRITON_INTERPRET=1 (the chunk and recurrent kernels, fla's short
convolution and norms) against its float64 reference (test_mesa_net_layer.reference: the exact solve, autograd):
the output and every parameter's gradient, packed sequences in both modes, and the switch from the recurrent kernel
to the chunk kernel above 64 tokens. Bounds: FlashAttention's rule (`fp32_bound`) against the same float32 layer on
its PyTorch paths. Sizes are tiny: the interpreter is slow.
"""

import os
import warnings

import pytest
import torch

from fla_mesa.layers import mesa_net as mesa_net_module
from tests.layers.test_mesa_net_layer import inputs, make_layer, reference
from tests.utils import FP32_FLOOR, fp32_bound, on_torch_paths, rel_err

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') != '1',
                                reason='the Triton path on the CPU: needs TRITON_INTERPRET=1 at start-up')


@pytest.fixture(autouse=True)
def triton_paths(monkeypatch):
    warnings.filterwarnings('ignore', message='ShortConvolution is crucial')


def run(layer, x, do, use_reference=False, **kwargs):
    """o and (with gradients) every parameter's gradient for the upstream gradient `do`."""
    o = reference(layer, x) if use_reference else layer(x, **kwargs)[0]
    if not torch.is_grad_enabled():
        return [o]
    # materialised: without the solve Λ is unused, its gradient zero
    return [o] + list(torch.autograd.grad(o, list(layer.parameters()), do.to(o.dtype), materialize_grads=True))


def check(names, out, base, ref):
    for name, a, b, r in zip(names, out, base, ref):
        err, floor = rel_err(a, r), rel_err(b, r)
        # the rule's premise: the baseline itself near the float32 floor (a bug in the layer's shared code would
        # move both paths alike and the baseline with them)
        assert floor <= 4 * FP32_FLOOR, f"{name}: PyTorch path {floor:.2e} off float64"
        # twice the op's rule: a parameter's gradient sums the op's gradients over tokens, which the two paths' kernels
        # form in different orders; and the rule's base at least the float32 floor: the PyTorch path's error on one of
        # 15 tensors can be luckily small (b_proj.bias 1.0e-7 against 3-9e-7 for the Triton path's tensors on one CPU)
        assert err <= 2 * fp32_bound(max(floor, FP32_FLOOR)), f"{name}: Triton path {err:.2e}, PyTorch path {floor:.2e}"


def spy_ops(monkeypatch):
    called = []
    for name in ('chunk_mesa', 'fused_recurrent_mesa'):
        real = getattr(mesa_net_module, name)
        monkeypatch.setattr(mesa_net_module, name,
                            lambda *a, _real=real, _name=name, **kw: (called.append(_name), _real(*a, **kw))[1])
    return called


@pytest.mark.parametrize('kwargs', [dict(), dict(use_solver=False, expand_v=2, use_output_gate=True, use_v_conv=True)],
                         ids=['default', 'gla-expand_v2-gate-vconv'])
@pytest.mark.parametrize('training', [True, False], ids=['chunk', 'fused_recurrent'])
def test_layer_triton_matches_float64(monkeypatch, kwargs, training):
    import copy
    layer = make_layer(**kwargs).train(training)
    called = spy_ops(monkeypatch)
    x, do = inputs(T=20), inputs(T=20, seed=2)
    with torch.set_grad_enabled(training):
        ref = run(copy.deepcopy(layer).double(), x.double(), do.double(), use_reference=True)
        base = on_torch_paths(monkeypatch, lambda: run(layer, x, do))
        called.clear()
        out = run(layer, x, do)
    assert called == ['chunk_mesa' if training else 'fused_recurrent_mesa']
    check(['o'] + [n for n, _ in layer.named_parameters()], out, base, ref)


@pytest.mark.parametrize('training', [True, False], ids=['chunk', 'fused_recurrent'])
def test_layer_triton_varlen_matches_float64(monkeypatch, training):
    # packed sequences of 5, 1 and 9 tokens: each against the float64 reference run on it alone (states reset at
    # every boundary, the short convolution's too)
    import copy
    layer = make_layer().train(training)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    x, do = inputs(B=1, T=15), inputs(B=1, T=15, seed=2)
    ref64 = copy.deepcopy(layer).double()
    with torch.set_grad_enabled(training):
        out = run(layer, x, do, cu_seqlens=cu)
        base = on_torch_paths(monkeypatch, lambda: run(layer, x, do, cu_seqlens=cu))
        ref = [reference(ref64, x[:, a:b].double()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        ref = [torch.cat(ref, 1)]
        if training:
            ref += list(torch.autograd.grad(ref[0], list(ref64.parameters()), do.double()))
    check(['o'] + [n for n, _ in layer.named_parameters()], out, base, ref)


@pytest.mark.parametrize('T, op', [(64, 'fused_recurrent_mesa'), (65, 'chunk_mesa')])
def test_layer_triton_recurrent_switch(monkeypatch, T, op):
    # in eval mode without gradients, up to 64 tokens run the recurrent kernel, more the chunk kernel (two chunks)
    import copy
    layer = make_layer().eval()
    called = spy_ops(monkeypatch)
    x = inputs(B=1, T=T)
    with torch.no_grad():
        ref = reference(copy.deepcopy(layer).double(), x.double())
        base = on_torch_paths(monkeypatch, lambda: layer(x)[0])
        called.clear()
        o = layer(x)[0]
    assert called == [op]
    check(['o'], [o], [base], [ref])
