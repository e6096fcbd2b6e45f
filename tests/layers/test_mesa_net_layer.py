# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The MesaNet layer on CPU through its PyTorch paths; one test compares them with fla's Triton modules (interpreter)."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from fla.models.utils import Cache

from fla_mesa.layers import MesaNet
from fla_mesa.layers import mesa_net as mesa_net_module
from fla_mesa.ops.mesa import naive_exact_mesa
from tests.utils import ON_GPU, assert_rel, fp32_bound, rel_err, torch_chunk_path

device = 'cpu'
INTERPRETING = os.environ.get('TRITON_INTERPRET', '0') == '1'


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    # the op and the layer run PyTorch on CPU tensors unless TRITON_INTERPRET=1: these tests check the layer, fast
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    warnings.filterwarnings('ignore', message='ShortConvolution is crucial')


def make_layer(dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(hidden_size=32, num_heads=2, head_dim=16, layer_idx=0, cg_tol_training=None, cg_tol_inference=None)
    args.update(kwargs)
    layer = MesaNet(**args).to(device=device, dtype=dtype)
    # random (not identity) norm weights and a spread of Λ, so that every parameter matters
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith('norm.weight'):
                p.uniform_(0.5, 1.5)
            elif name == 'lambda_params':
                p.normal_(0.0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return layer


def inputs(B=2, T=12, D=32, dtype=torch.float32, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def reference(layer, x):
    """The layer written out in float64 from its weights: causal convs, SiLU, gates, the exact solve, norm, proj."""
    layer = layer.double()
    x = x.double()
    H, K, V, W = layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.conv_size

    def conv(module, y):
        y = F.conv1d(F.pad(y.transpose(1, 2), (W - 1, 0)), module.weight, module.bias, groups=y.shape[-1])
        return F.silu(y.transpose(1, 2))

    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    if layer.use_short_conv:
        q, k = conv(layer.q_conv1d, q), conv(layer.k_conv1d, k)
        if layer.use_v_conv:
            v = conv(layer.v_conv1d, v)
    else:
        q, k = F.silu(q), F.silu(k)
    q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V))
    beta = torch.sigmoid(layer.b_proj(x))
    gamma = torch.sigmoid(layer.a_proj(x))
    if layer.use_gamma_cap:
        gamma = gamma * (1 - (1 - layer.gamma_cap) * beta ** 2)
    lamb = layer.lambda_lower_bound + F.softplus(layer.lambda_params).view(H, K)
    if layer.use_solver:
        o, _ = naive_exact_mesa(q, k, v, gamma.log(), beta, lamb, use_qk_l2norm_in_kernel=True)
    else:
        # gated linear attention: o_t = S_tᵀ q_t with unit-norm q and k
        q, k = (y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True) + 1e-6) for y in (q, k))
        s, o = 0, []
        for t in range(x.shape[1]):
            s = gamma[:, t, :, None, None] * s + beta[:, t, :, None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
            o.append(torch.einsum('bhk,bhkv->bhv', q[:, t], s))
        o = torch.stack(o, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    if layer.use_output_gate:
        o = o * F.silu(layer.g_proj(x).unflatten(-1, (H, V)))
    return layer.o_proj(o.flatten(-2))


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(expand_v=2, use_output_gate=True, use_v_conv=True),
    dict(use_short_conv=False, use_gamma_cap=False),
    dict(use_solver=False),
], ids=['default', 'expand_v2-gate-vconv', 'noconv-nocap', 'gla'])
@pytest.mark.parametrize('training', [True, False], ids=['chunk', 'fused_recurrent'])
def test_layer_matches_float64_reference(kwargs, training):
    layer = make_layer(dtype=torch.float64, **kwargs).train(training)
    x = inputs(T=20, dtype=torch.float64)
    with torch.set_grad_enabled(training):
        o, attn, cache = layer(x)
    assert attn is None and cache is None
    # a float64 layer still forms Λ, β and g in float32 (as fla's layers do): their rounding is the floor here
    assert_rel('o', o, reference(layer, x), 3e-7)
    steps = layer.last_cg_steps
    assert steps.shape == (2, 20, 2)
    assert (steps == 0).all() if not layer.use_solver else (steps > 0).all()


def test_varlen_matches_float64_reference():
    # packed sequences of 5, 1 and 9 tokens against the float64 reference run on each alone: every state, the short
    # convolutions' too, starts afresh at a boundary (comparing with a dense batch would not see a state carried
    # from one row to the next, as both would carry it)
    layer = make_layer(dtype=torch.float64)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32, device=device)
    x = inputs(B=1, T=15, dtype=torch.float64)
    ref = torch.cat([reference(layer, x[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    for training in (True, False):
        with torch.set_grad_enabled(training):
            o, _, _ = layer.train(training)(x, cu_seqlens=cu)
        # as test_layer_matches_float64_reference
        assert_rel(f"o ({'chunk' if training else 'fused_recurrent'})", o, ref, 3e-7)


def test_gamma_cap_formula(monkeypatch):
    layer = make_layer(gamma_cap=0.9)
    seen = {}
    real = mesa_net_module.chunk_mesa

    def spy(q, k, v, g, beta, lamb, **kwargs):
        seen.update(g=g, beta=beta)
        return real(q, k, v, g, beta, lamb, **kwargs)

    monkeypatch.setattr(mesa_net_module, 'chunk_mesa', spy)
    x = inputs()
    layer(x)
    gamma = torch.sigmoid(layer.a_proj(x).float()) * (1 - 0.1 * torch.sigmoid(layer.b_proj(x).float()) ** 2)
    torch.testing.assert_close(seen['g'], gamma.log(), rtol=1e-5, atol=1e-6)
    layer.use_gamma_cap = False
    layer(x)
    torch.testing.assert_close(seen['g'], F.logsigmoid(layer.a_proj(x).float()))


def test_dense_equals_varlen():
    # here and below, two float32 runs of the layer, each about a float32 floor (3e-7) off the truth: 1e-6
    layer = make_layer()
    x = inputs(B=3, T=20)
    o_dense, _, _ = layer(x)
    cu_seqlens = torch.tensor([0, 20, 40, 60], dtype=torch.int32, device=device)
    o_var, _, _ = layer(x.reshape(1, 60, -1), cu_seqlens=cu_seqlens)
    assert_rel('o', o_var.view_as(o_dense), o_dense, 1e-6)
    # and the gradients of every parameter
    grads_dense = torch.autograd.grad(o_dense.square().sum(), list(layer.parameters()))
    o_var, _, _ = layer(x.reshape(1, 60, -1), cu_seqlens=cu_seqlens)
    grads_var = torch.autograd.grad(o_var.square().sum(), list(layer.parameters()))
    for (name, _), a, b in zip(layer.named_parameters(), grads_var, grads_dense):
        assert_rel(name, a, b, 1e-4)


def test_cu_seqlens_wins_over_an_attention_mask():
    # fla's layer contract (its tests/layers/test_attn_varlen_pack_layout.py): packed sequences given as cu_seqlens
    # are what the layer runs, an all-ones mask passed beside them changes nothing
    layer = make_layer()
    x = inputs(B=1, T=30)
    cu_seqlens = torch.tensor([0, 11, 30], dtype=torch.int32, device=device)
    expected, _, _ = layer(x, cu_seqlens=cu_seqlens)
    actual, _, _ = layer(x, attention_mask=torch.ones(1, 30, dtype=torch.long, device=device), cu_seqlens=cu_seqlens)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # and they are packed sequences, not one: the second starts from an empty state
    first, _, _ = layer(x[:, 11:])
    assert_rel('o', expected[:, 11:], first, 1e-6)


@pytest.mark.parametrize('grad', [True, False], ids=['chunk', 'fused_recurrent'])
def test_padding_mask_equals_per_sample(grad):
    layer = make_layer().train(grad)
    lens = [12, 7, 3]
    x = inputs(B=3, T=12)
    mask = torch.zeros(3, 12, dtype=torch.long, device=device)
    for i, n in enumerate(lens):
        mask[i, 12 - n:] = 1  # left padding, as in generation
    with torch.set_grad_enabled(grad):
        o, _, _ = layer(x, attention_mask=mask)
        for i, n in enumerate(lens):
            o_i, _, _ = layer(x[i:i + 1, 12 - n:])
            assert_rel(f'sample {i}', o[i, 12 - n:], o_i[0], 1e-6)


@pytest.mark.parametrize('kwargs', [dict(), dict(use_short_conv=False), dict(use_v_conv=True, expand_v=0.5)],
                         ids=['default', 'noconv', 'vconv'])
@pytest.mark.parametrize('pieces', [[6] + [1] * 10, [6, 3, 5, 2], [1, 15]], ids=['one-by-one', 'chunks', 'decode-first'])
def test_cache_continuation_equals_full(kwargs, pieces):
    layer = make_layer(**kwargs).eval()
    x = inputs(T=16)
    with torch.no_grad():
        o_full, _, _ = layer(x)
        cache, outs, t = Cache(), [], 0
        for n in pieces:
            o, _, cache = layer(x[:, t:t + n], past_key_values=cache, use_cache=True)
            outs.append(o)
            t += n
    assert_rel('o', torch.cat(outs, 1), o_full, 1e-6)
    assert cache.get_seq_length(0) == 16


def test_cache_continuation_chunk_mode_and_mask():
    # with gradients the layer takes the chunk path: continuing from a cache must work there too, and with padding
    layer = make_layer()
    x = inputs(B=2, T=16)
    mask = torch.ones(2, 16, dtype=torch.long, device=device)
    mask[1, :5] = 0
    o_full, _, _ = layer(x, attention_mask=mask)
    cache, outs = Cache(), []
    for a, b in ((0, 9), (9, 13), (13, 16)):
        o, _, cache = layer(x[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True)
        outs.append(o)
    o = torch.cat(outs, 1)
    assert_rel('o', o[mask.bool()], o_full[mask.bool()], 1e-6)


def test_backward_all_parameters_finite():
    layer = make_layer(use_output_gate=True, use_v_conv=True, expand_v=2)
    x = inputs().requires_grad_()
    o, _, _ = layer(x)
    o.square().mean().backward()
    for name, p in list(layer.named_parameters()) + [('x', x)]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_init_values():
    torch.manual_seed(0)
    layer = MesaNet(hidden_size=32, num_heads=4, head_dim=8)
    torch.testing.assert_close(layer.get_lambda(), torch.ones(4, 8))
    gamma = torch.sigmoid(layer.a_proj.bias)
    assert ((gamma > 0.89) & (gamma < 0.9991)).all()
    layer = MesaNet(hidden_size=32, num_heads=4, head_dim=8, lambda_lower_bound=0.1, lambda_initial_value=2.0)
    torch.testing.assert_close(layer.get_lambda(), torch.full((4, 8), 2.0))
    # fla's constructor keywords are accepted
    layer = MesaNet(hidden_size=32, num_heads=4, head_dim=8, max_cg_step_training=7, max_cg_step_decoding=5)
    assert (layer.cg_max_steps_training, layer.cg_max_steps_inference) == (7, 5)


@pytest.mark.parametrize('mode', ['chunk', 'fused_recurrent'])
def test_unconverged_tokens_flagged(mode):
    # one CG step cannot reach a relative residual of 1e-6 on these states; 40 steps can (K = 16)
    x = inputs(T=20)
    for steps, warn in ((1, True), (40, False)):
        layer = make_layer(cg_max_steps_inference=steps, cg_tol_inference=1e-6, warn_unconverged=warn).eval()
        layer.mode = mode
        with torch.no_grad():
            if warn:
                with pytest.warns(RuntimeWarning, match='stopped without reaching cg_tol'):
                    layer(x)
            else:
                layer(x)
        flags = layer.last_cg_unconverged
        assert flags.dtype == torch.bool and flags.shape == layer.last_cg_steps.shape == (2, 20, 2)
        assert flags.all() if steps == 1 else not flags.any()
        assert (layer.last_cg_steps >= 1).all() and (layer.last_cg_steps <= steps).all()
    # with cg_tol None every token runs its steps by request: nothing is flagged
    layer = make_layer(cg_max_steps_inference=1, cg_tol_inference=None).eval()
    with torch.no_grad():
        layer(x)
    assert not layer.last_cg_unconverged.any()


@pytest.mark.parametrize('precondition', ['chunk', 'auto'])
@pytest.mark.parametrize('training', [True, False], ids=['chunk', 'fused_recurrent'])
def test_chunk_start_preconditioner(monkeypatch, training, precondition):
    # 'chunk' and 'auto' reach the chunk op as they are and the recurrent op (decoding: no chunk start) as Jacobi;
    # both converge to the float64 layer's output (cg_tol None: to the float32 residual floor)
    seen = []
    for name in ('chunk_mesa', 'fused_recurrent_mesa'):
        real = getattr(mesa_net_module, name)
        monkeypatch.setattr(mesa_net_module, name, lambda *a, _real=real, _name=name, **kw: (
            seen.append((_name, kw['precondition'])), _real(*a, **kw))[1])
    layer = make_layer(precondition=precondition).train(training)
    x = inputs(T=20)
    with torch.set_grad_enabled(training):
        o, _, _ = layer(x)
    assert seen == [('chunk_mesa', precondition)] if training else [('fused_recurrent_mesa', True)]
    assert_rel('o', o, reference(copy.deepcopy(layer), x), 1e-6)


@pytest.mark.parametrize('value', [1, 'jacobi', None])
def test_bad_precondition(value):
    with pytest.raises(ValueError, match="`precondition`.*'chunk'"):
        MesaNet(hidden_size=32, num_heads=2, head_dim=16, precondition=value)


def test_train_and_eval_cg_settings(monkeypatch):
    layer = make_layer(cg_max_steps_training=3, cg_tol_training=None, cg_max_steps_inference=5, cg_tol_inference=0.5)
    seen = []
    for name in ('chunk_mesa', 'fused_recurrent_mesa'):
        real = getattr(mesa_net_module, name)
        monkeypatch.setattr(mesa_net_module, name, lambda *a, _real=real, _name=name, **kw: (
            seen.append((_name, kw['cg_max_steps'], kw['cg_tol'], kw['check_values'])), _real(*a, **kw))[1])
    x = inputs()
    layer.train()
    layer(x)
    layer.eval()
    with torch.no_grad():
        layer(x)
        layer.mode = 'chunk'
        layer(inputs(T=70))
    # check_values off: Λ and g are valid by construction, and the check would sync the host in every layer
    assert seen == [('chunk_mesa', 3, None, False), ('fused_recurrent_mesa', 5, 0.5, False),
                    ('chunk_mesa', 5, 0.5, False)]
    assert (layer.last_cg_steps <= 5).all()


@pytest.mark.parametrize('name, value', [
    ('hidden_size', 0), ('num_heads', -1), ('head_dim', 1.5), ('expand_v', 0.3), ('mode', 'parallel'),
    ('conv_size', 0), ('lambda_lower_bound', 0.0), ('lambda_initial_value', 0.2), ('gamma_cap', 1.5),
    ('cg_max_steps_training', -1), ('cg_max_steps_inference', 2.0), ('cg_tol_training', 1.0), ('cg_tol_inference', -0.1),
    ('chunk_size', 48), ('layer_idx', -2), ('norm_eps', 0),
])
def test_bad_arguments(name, value):
    with pytest.raises(ValueError, match=f'`{name}`'):
        MesaNet(**{**dict(hidden_size=32, num_heads=2, head_dim=16), name: value})


def test_bad_forward_inputs():
    layer = make_layer()
    with pytest.raises(ValueError, match='attention_mask'):
        layer(inputs(), attention_mask=torch.ones(2, 12, 12))
    with pytest.raises(ValueError, match='layer_idx'):
        MesaNet(hidden_size=32, num_heads=2, head_dim=16)(inputs(), past_key_values=Cache(), use_cache=True)


def test_lambda_is_used_and_learnt():
    layer = make_layer()
    x = inputs()
    o, _, _ = layer(x)
    o.square().sum().backward()
    assert layer.lambda_params.grad.abs().min() > 0
    assert (layer.get_lambda() > layer.lambda_lower_bound).all()


@pytest.mark.skipif(not INTERPRETING, reason='needs TRITON_INTERPRET=1 at start-up (fla kernels are compiled at import)')
def test_fla_modules_match_torch_fallbacks(monkeypatch):
    layer = make_layer(use_output_gate=True, use_v_conv=True)
    x = inputs(T=10)

    def run(interpret):
        monkeypatch.setenv('TRITON_INTERPRET', interpret)
        torch_chunk_path(monkeypatch)
        layer.eval()
        with torch.no_grad():
            o_full, _, _ = layer(x)
            cache, outs = Cache(), []
            for a, b in ((0, 4), (4, 5), (5, 10)):
                o, _, cache = layer(x[:, a:b], past_key_values=cache, use_cache=True)
                outs.append(o)
        layer.train()
        o_train, _, _ = layer(x)
        grads = torch.autograd.grad(o_train.square().sum(), list(layer.parameters()))
        return o_full, torch.cat(outs, 1), cache[0]['conv_state'], grads

    ref, test = run('0'), run('1')
    for name, a, b in zip(['full', 'cached'], test[:2], ref[:2]):
        assert_rel(name, a, b, 1e-5)
    for a, b in zip(test[2], ref[2]):
        assert_rel('conv_state', a, b, 1e-6)
    for (name, _), a, b in zip(layer.named_parameters(), test[3], ref[3]):
        assert_rel(name, a, b, 1e-4)


def run_layer(layer, x, do, use_reference=False):
    """o and the gradients of every parameter for the upstream gradient `do`."""
    o = reference(layer, x) if use_reference else layer(x)[0]
    if not torch.is_grad_enabled():
        return [o]
    return [o] + list(torch.autograd.grad(o, list(layer.parameters()), do.to(o.dtype)))


@pytest.mark.skipif(not ON_GPU, reason="the layer with its GPU kernels (fla's modules, the chunk and recurrent ops)")
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('kwargs', [dict(), dict(expand_v=2, use_output_gate=True, use_v_conv=True)],
                         ids=['default', 'expand_v2-gate-vconv'])
@pytest.mark.parametrize('training', [True, False], ids=['chunk', 'fused_recurrent'])
def test_layer_on_gpu_matches_float64(kwargs, training, dtype):
    # FlashAttention's rule with the GPU factor (`fp32_bound`): off the float64 reference by at most 2x what the same
    # layer in the same dtype loses on the CPU (its PyTorch paths; floor 2e-6), times 3 for the kernels' split
    # products; the output and every parameter's gradient; T = 70: two chunks
    import copy
    layer = make_layer(**kwargs).train(training)
    x, do = inputs(T=70), inputs(T=70, seed=2)
    with torch.set_grad_enabled(training):
        ref = run_layer(copy.deepcopy(layer).double(), x.double(), do.double(), use_reference=True)
        cpu = run_layer(copy.deepcopy(layer).to(dtype), x.to(dtype), do)
        gpu = run_layer(copy.deepcopy(layer).to('cuda', dtype), x.to('cuda', dtype), do.cuda())
    names = ['o'] + [name for name, _ in layer.named_parameters()]
    for name, a, b, r in zip(names, gpu, cpu, ref):
        base = rel_err(b, r)
        assert rel_err(a.cpu(), r) <= fp32_bound(base, gpu=True), f"{name}: GPU {rel_err(a.cpu(), r):.2e}, CPU {base:.2e}"
