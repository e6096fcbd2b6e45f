# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The layer's recompute in training (of q's conv and L2 norm: on fla's Triton conv one autograd node each for q and
k, `short_conv_l2norm`, else a checkpoint around q's): the same output as without it to the bit, the same gradients
to the bit where a checkpoint recomputes (the same ops) and within rounding where `short_conv_l2norm` does (its own
backward; against float64 in tests/ops/test_conv_l2norm.py), and the activations kept for the backward smaller by
what it leaves out. The Triton path's tests need TRITON_INTERPRET=1 at start-up.
"""

import os
import warnings

import pytest
import torch
from fla.models.utils import Cache

from fla_mesa.layers import mesa_net as mesa_net_module
from fla_mesa.ops.mesa.utils import pack_cg_steps, split_cg_steps
from tests.layers.test_mesa_net_layer import inputs, make_layer
from tests.utils import assert_rel, torch_chunk_path

INTERPRETING = os.environ.get('TRITON_INTERPRET', '0') == '1'
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason='the Triton path on the CPU: needs TRITON_INTERPRET=1')


@pytest.fixture(autouse=True)
def no_conv_warning():
    warnings.filterwarnings('ignore', message='ShortConvolution is crucial')


def run(layer, x, do, **kwargs):
    """o, dx and every parameter's gradient."""
    x = x.detach().requires_grad_()
    o = layer(x, **kwargs)[0]
    grads = torch.autograd.grad(o, [x, *layer.parameters()], do, materialize_grads=True)
    return [o, *grads]


CONFIGS = dict(default=dict(), noconv_nocap=dict(use_short_conv=False, use_gamma_cap=False),
               gate_vconv=dict(use_output_gate=True, use_v_conv=True))


@pytest.mark.parametrize('path, varlen, config', [
    *[('torch', varlen, config) for varlen in ('dense', 'varlen') for config in CONFIGS],
    # the interpreter is slow: every config once, varlen once
    *[pytest.param('triton', varlen, config, marks=needs_interpreter)
      for varlen, config in (('dense', 'default'), ('dense', 'noconv_nocap'), ('varlen', 'gate_vconv'))],
])
def test_recompute_same_results(monkeypatch, path, varlen, config):
    # against the same layer's path that recomputes nothing (a cache: the conv states are outputs, the op normalises
    # q and k) and, where the checkpoint recomputes, against it run as a plain call: equal to the bit, tolerance 0;
    # `short_conv_l2norm`'s gradients (its own backward) within a few of bf16's ulps
    if path == 'torch':
        monkeypatch.setenv('TRITON_INTERPRET', '0')
        torch_chunk_path(monkeypatch)
    dtype = torch.bfloat16 if path == 'triton' else torch.float32
    layer = make_layer(dtype=dtype, cg_tol_training=1e-4, **CONFIGS[config]).train()
    B, T = (1, 20) if varlen == 'varlen' else (2, 12)
    x, do = inputs(B=B, T=T, dtype=dtype), inputs(B=B, T=T, dtype=dtype, seed=2)
    extra = dict(cu_seqlens=torch.tensor([0, 7, 8, 20], dtype=torch.int32)) if varlen == 'varlen' else {}

    calls, fused = [], []
    real, real_fused = mesa_net_module.checkpoint, mesa_net_module.short_conv_l2norm
    monkeypatch.setattr(mesa_net_module, 'checkpoint', lambda fn, *a, **kw: (calls.append(fn), real(fn, *a, **kw))[1])
    monkeypatch.setattr(mesa_net_module, 'short_conv_l2norm',
                        lambda conv, *a, **kw: (fused.append(conv), real_fused(conv, *a, **kw))[1])
    out = run(layer, x, do, **extra)
    # one node each for k and q on fla's Triton conv; a checkpoint of q otherwise
    is_fused = path == 'triton' and layer.use_short_conv
    assert (fused, len(calls)) == (([layer.k_conv1d, layer.q_conv1d], 0) if is_fused else ([], 1))
    refs = {'cache': run(layer, x, do, past_key_values=Cache(), use_cache=True, **extra)}
    assert len(fused) == 2 * is_fused and len(calls) == 1 - is_fused
    if not is_fused:
        monkeypatch.setattr(mesa_net_module, 'checkpoint', lambda fn, *a, **kw: (calls.append(fn), fn(*a))[1])
        refs['no checkpoint'] = run(layer, x, do, **extra)
        assert len(calls) == 2
    names = ['o', 'x'] + [n for n, _ in layer.named_parameters()]
    for ref_name, ref in refs.items():
        for name, a, b in zip(names, out, ref):
            if is_fused and name != 'o':
                assert_rel(f"{name} against {ref_name}", a, b, 1e-2)
            else:
                assert torch.equal(a, b), f"{name} against {ref_name}: {(a - b).abs().max().item():.3g}"


def saved_bytes_per_token(layer, x, **kwargs):
    """
    Bytes per token that the layer's forward keeps for its backward (what autograd saves, each storage once,
    parameters left out), and those it keeps on itself (the CG step counts).
    """
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.detach().requires_grad_(), **kwargs)
    record = getattr(layer, '_cg_record', None)
    kept = 0 if record is None else record.nbytes
    return sum(storages.values()) / x.shape[:2].numel(), kept / x.shape[:2].numel()


@needs_interpreter
@pytest.mark.parametrize('varlen', [False, True], ids=['dense', 'varlen'])
def test_recompute_saves_activations(varlen):
    # bf16 on the Triton path, as trained. Not kept any more, per token: q's L2 norm output (2 bytes per key unit)
    # and q's and k's rstd (4 per head each; k's normalised output the op keeps). At the benchmark's size (8 heads
    # of 128) 2112 bytes. (log γ's fused gate keeps a's bf16 projection and β on both paths: test_gate.py)
    H, K = 2, 64
    layer = make_layer(dtype=torch.bfloat16, hidden_size=H * K, num_heads=H, head_dim=K).train()
    x = inputs(B=1 if varlen else 2, T=64, D=H * K, dtype=torch.bfloat16)
    extra = dict(cu_seqlens=torch.tensor([0, 30, 64], dtype=torch.int32)) if varlen else {}
    saved, _ = saved_bytes_per_token(layer, x, **extra)
    # the same layer on its path that recomputes nothing (a cache: the conv states are outputs)
    saved_all, _ = saved_bytes_per_token(layer, x, past_key_values=Cache(), use_cache=True, **extra)
    assert saved_all - saved == 2 * H * K + 8 * H


@needs_interpreter
def test_saved_activations_not_above_fla():
    # the measure: fla-mesa keeps no more per token and layer than fla's MesaNet of the same size (both bf16
    # on their Triton paths; fla-mesa's CG step counts on the module included). fla's log-sigmoid keeps a float32
    # buffer (4 bytes per head) on the CPU only, none on CUDA: left out, so that this is the GPU's comparison
    from fla.layers import MesaNet as FlaMesaNet
    H, K = 2, 64
    kwargs = dict(hidden_size=H * K, num_heads=H, head_dim=K, layer_idx=0)
    torch.manual_seed(0)
    x = torch.randn(1, 64, H * K, dtype=torch.bfloat16)
    saved, kept = saved_bytes_per_token(mesa_net_module.MesaNet(**kwargs).to(torch.bfloat16).train(), x)
    saved_fla, kept_fla = saved_bytes_per_token(FlaMesaNet(**kwargs).to(torch.bfloat16).train(), x)
    assert kept_fla == 0
    saved_fla -= 4 * H
    # the CG record: 1 byte a token and head at the default 30 steps
    assert kept == H
    assert saved + kept <= saved_fla, f"fla-mesa {saved} + {kept}, fla {saved_fla} bytes per token"


@pytest.mark.parametrize('cg_max_steps, dtype', [(30, torch.int8), (63, torch.int8), (64, torch.int16),
                                                 (20000, torch.int32)])
def test_cg_record_round_trip(cg_max_steps, dtype):
    # what the layer keeps: steps and the unconverged mask in one tensor, in the narrowest dtype that holds 'auto''s
    # two solves (up to 2 * cg_max_steps), decoded exactly
    steps = torch.tensor([0, 1, cg_max_steps, 2 * cg_max_steps, 2 * cg_max_steps], dtype=torch.int32)
    unconverged = torch.tensor([False, True, False, False, True])
    packed = pack_cg_steps(torch.where(unconverged, ~steps, steps), cg_max_steps)
    assert packed.dtype == dtype
    got_steps, got_unconverged = split_cg_steps(packed)
    assert torch.equal(got_steps.int(), steps) and torch.equal(got_unconverged, unconverged)
