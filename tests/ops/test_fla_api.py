# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
fla's `tests/ops/test_mesa.py` ported to `fla_mesa.ops.mesa.chunk_mesa_net` / `mesa_net_decoding_one_step`: the same
calls, inputs drawn as fla draws them, at sizes the interpreter runs, against a float64 exact solve where fla compares
against its float32 naive solve, and against the float64 definition of fla's CG where fla checks a few CG steps.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F
from fla.ops.mesa_net import chunk_mesa_net as fla_chunk_mesa_net
from fla.ops.mesa_net import mesa_net_decoding_one_step as fla_decoding_one_step
from fla.ops.mesa_net import naive_mesa_net_decoding_one_step

from fla_mesa.ops.mesa import chunk_mesa_net, mesa_net_decoding_one_step, naive_exact_mesa, naive_recurrent_mesa
from tests.utils import ON_GPU, on_cuda, rel_err

# about 2.5x the largest relative error measured against float64 (3x more on a GPU, for the kernels' split products,
# as tests.utils.fp32_bound): float16 inputs give float16 outputs and gradients, whose rounding sets the floor there
BOUND = {torch.float32: 8e-6 * (3 if ON_GPU else 1), torch.float16: 8e-4}
# one token, no gradients: float32 is a few roundings off
BOUND_DECODING = {torch.float32: 5e-7 * (3 if ON_GPU else 1), torch.float16: 6e-4}


def fla_inputs(B, T, H, D, gate_range, dtype, N=None, seed=42):
    """fla's test inputs: q, v ~ U(0, 0.1), unit-norm positive k, sigmoid β, g = log U(gate_range), rank-1 h_kk_init."""
    gen = torch.Generator().manual_seed(seed)
    N = B if N is None else N

    def rand(*s):
        return torch.rand(*s, generator=gen, dtype=torch.float64)

    q = (rand(B, T, H, D) / 10).to(dtype)
    k = F.normalize(rand(B, T, H, D), p=2, dim=-1).to(dtype)
    v = (rand(B, T, H, D) / 10).to(dtype)
    beta = rand(B, T, H).to(dtype).sigmoid()
    lo, hi = gate_range
    g = (lo + (hi - lo) * rand(B, T, H)).log().float()
    lamb = (rand(H, D).to(dtype).sigmoid() * 0.75 + 0.25).to(dtype)
    k0 = F.normalize(rand(N, H, D).to(dtype).double(), p=2, dim=-1)
    h_kk_init = (k0.unsqueeze(-1) * k0.unsqueeze(-2)).float()
    h_kv_init = rand(N, H, D, D).float()
    return dict(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb, h_kk_init=h_kk_init, h_kv_init=h_kv_init)


def outputs_and_grads(fn, inputs, do, dht, **kwargs):
    """`fn(**inputs)` -> (o, h_kk, h_kv); backpropagates `o·do + h_kk·dh_kk + h_kv·dh_kv` as fla's test does."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    o, h_kk, h_kv = fn(**leaves, output_final_state=True, **kwargs)
    ((o * do.to(o.dtype)).sum() + (h_kk * dht[0].to(h_kk.dtype)).sum() + (h_kv * dht[1].to(h_kv.dtype)).sum()).backward()
    return (o, h_kk, h_kv), {'d' + name: x.grad for name, x in leaves.items()}


def exact(q, k, v, g, beta, lamb, h_kk_init, h_kv_init, output_final_state, cu_seqlens=None):
    """The float64 exact solve, with fla's argument names."""
    o, (h_kk, h_kv) = naive_exact_mesa(
        *(x.double() for x in (q, k, v, g, beta, lamb)), initial_state=(h_kk_init.double(), h_kv_init.double()),
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    return o, h_kk, h_kv


def check_against_exact(inputs, cu_seqlens=None, bound=None, **kwargs):
    gen = torch.Generator().manual_seed(0)
    do = torch.rand(inputs['v'].shape, generator=gen, dtype=torch.float64)
    dht = tuple(torch.rand(inputs[name].shape, generator=gen, dtype=torch.float64) for name in ('h_kk_init', 'h_kv_init'))
    fn = on_cuda(chunk_mesa_net) if ON_GPU else chunk_mesa_net
    tri, tri_grads = outputs_and_grads(fn, inputs, do, dht, cu_seqlens=cu_seqlens, **kwargs)
    ref, ref_grads = outputs_and_grads(exact, inputs, do, dht, cu_seqlens=cu_seqlens)
    assert tri[0].dtype == inputs['v'].dtype and tri[1].dtype == tri[2].dtype == torch.float32
    for name, x, r in zip(('o', 'h_kk_final', 'h_kv_final'), tri, ref):
        err = rel_err(x, r)
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.0e}"
    for name in ref_grads:
        assert tri_grads[name].dtype == inputs[name[1:]].dtype, name
        err = rel_err(tri_grads[name], ref_grads[name])
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.0e}"


def test_signatures_match_fla():
    # fla's callers pass these by name and position: names, order and defaults must be fla's
    for ours, theirs in ((chunk_mesa_net, fla_chunk_mesa_net), (mesa_net_decoding_one_step, fla_decoding_one_step)):
        ours_p, theirs_p = inspect.signature(ours).parameters, inspect.signature(inspect.unwrap(theirs)).parameters
        assert list(ours_p) == list(theirs_p)
        assert [p.default for p in ours_p.values()] == [p.default for p in theirs_p.values()]


@pytest.mark.parametrize(
    ('B', 'T', 'H', 'D', 'gate_range', 'dtype'),
    [
        pytest.param(*c, id='B{}-T{}-H{}-D{}-gate_range{}-{}'.format(*c))
        for c in [
            (1, 15, 1, 16, (0.8, 0.99), torch.float16),
            (2, 20, 1, 12, (0.8, 0.99), torch.float32),
            (1, 70, 1, 16, (0.8, 0.99), torch.float16),
            (1, 20, 2, 16, (0.01, 0.1), torch.float16),
            (1, 20, 2, 16, (1, 1), torch.float32),
        ]
    ],
)
def test_chunk(B, T, H, D, gate_range, dtype):
    # fla's test_chunk: D CG steps (converged), initial states, gradients of o and both final states
    check_against_exact(fla_inputs(B, T, H, D, gate_range, dtype), max_CG_iteration=D, bound=BOUND[dtype])


@pytest.mark.parametrize(
    ('H', 'D', 'gate_range', 'cu_seqlens', 'dtype'),
    [
        pytest.param(*c, id='H{}-D{}-gate_range{}-cu_seqlens{}-{}'.format(*c))
        for c in [
            (1, 10, (0.8, 0.99), [0, 15], torch.float16),
            (1, 16, (0.8, 0.99), [0, 14, 21, 50], torch.float16),
            (1, 16, (0.01, 0.1), [0, 33, 50], torch.float32),
            (1, 12, (1, 1), [0, 5, 20, 21, 40], torch.float16),
        ]
    ],
)
def test_chunk_varlen(H, D, gate_range, cu_seqlens, dtype):
    # fla's test_chunk_varlen: packed sequences, one initial state each; fla's default of 30 CG steps (>= D)
    N = len(cu_seqlens) - 1
    inputs = fla_inputs(1, cu_seqlens[-1], H, D, gate_range, dtype, N=N)
    check_against_exact(inputs, cu_seqlens=torch.tensor(cu_seqlens), bound=BOUND[dtype])


def test_chunk_returns_none_states_and_takes_one_state():
    inputs = fla_inputs(1, 20, 2, 16, (0.8, 0.99), torch.float32)
    o, h_kk, h_kv = chunk_mesa_net(**{n: x for n, x in inputs.items() if not n.startswith('h_')})
    assert h_kk is None and h_kv is None and o.shape == inputs['v'].shape
    # fla takes either initial state alone: the other is zero
    o_kv, _, _ = chunk_mesa_net(**{n: x for n, x in inputs.items() if n != 'h_kk_init'}, max_CG_iteration=16)
    ref, _, _ = exact(**{**inputs, 'h_kk_init': torch.zeros_like(inputs['h_kk_init'])}, output_final_state=True)
    assert rel_err(o_kv, ref) <= BOUND_DECODING[torch.float32]  # 16 steps of a float32 forward: as tight


def decoding_inputs(B, H, D, gate_range, dtype):
    x = fla_inputs(B, 1, H, D, gate_range, dtype)
    # fla's decoding test draws q and v from U(0, 1) and k from a normal: scale as fla does
    x['q'], x['v'] = x['q'] * 10, x['v'] * 10
    inputs = {n: x[n].squeeze(1) for n in ('q', 'k', 'v', 'g', 'beta')}
    inputs.update(lamb=x['lamb'], prev_h_kk=x['h_kk_init'], prev_h_kv=x['h_kv_init'])
    return inputs


def definition(q, k, v, g, lamb, beta, prev_h_kk, prev_h_kv, max_CG_iteration):
    """fla's decoding CG (plain CG from the Jacobi start, fixed steps) in float64: the project's CG without preconditioning."""
    o, (h_kk, h_kv) = naive_recurrent_mesa(
        *(x.double().unsqueeze(1) for x in (q, k, v, g, beta)), lamb.double(),
        initial_state=(prev_h_kk.double(), prev_h_kv.double()), output_final_state=True,
        cg_max_steps=max_CG_iteration, cg_tol=None, precondition=False,
    )
    return o.squeeze(1), h_kk, h_kv


@pytest.mark.parametrize(
    ('B', 'H', 'D', 'gate_range', 'max_CG_step', 'dtype'),
    [
        pytest.param(*c, id='B{}-H{}-D{}-gate_range{}-max_CG_step{}-{}'.format(*c))
        for c in [
            (1, 3, 10, (0.95, 0.99), 1, torch.float16),
            (2, 4, 12, (0.95, 0.99), 5, torch.float16),
            (2, 2, 16, (0.95, 0.99), 1, torch.float32),
            (2, 2, 16, (0.95, 0.99), 5, torch.float32),
            (2, 2, 16, (0.95, 0.99), 30, torch.float16),
        ]
    ],
)
def test_decoding_one_step(B, H, D, gate_range, max_CG_step, dtype):
    inputs = decoding_inputs(B, H, D, gate_range, dtype)
    fn = on_cuda(mesa_net_decoding_one_step) if ON_GPU else mesa_net_decoding_one_step
    o, h_kk, h_kv = fn(**inputs, max_CG_iteration=max_CG_step)
    assert o.dtype == dtype and h_kk.dtype == h_kv.dtype == torch.float32
    assert not (o.requires_grad or h_kk.requires_grad)
    ref = definition(**inputs, max_CG_iteration=max_CG_step)
    for name, x, r in zip(('o', 'h_kk', 'h_kv'), (o, h_kk, h_kv), ref):
        err = rel_err(x, r)
        assert err <= BOUND_DECODING[dtype], f"{name}: relative error {err:.2e} > {BOUND_DECODING[dtype]:.0e}"
    if max_CG_step >= D:
        # converged: the exact solve
        x = {n: t.unsqueeze(1) for n, t in inputs.items() if n in ('q', 'k', 'v', 'g', 'beta')}
        o_exact, _, _ = exact(**x, lamb=inputs['lamb'], h_kk_init=inputs['prev_h_kk'], h_kv_init=inputs['prev_h_kv'],
                              output_final_state=True)
        assert rel_err(o, o_exact.squeeze(1)) <= BOUND_DECODING[dtype]


@pytest.mark.parametrize('max_CG_step', [1, 3, 8])
def test_decoding_definition_is_flas(max_CG_step):
    # fla's own float32 reference against the float64 definition the tests above hold the kernel to: the same
    # iteration once q is large enough that fla's 1e-5 in α's and β's denominators is negligible (it is scale-free
    # but for them); at fla's test scale they move the result (docs/upstream.md)
    inputs = decoding_inputs(2, 2, 16, (0.95, 0.99), torch.float32)
    inputs['q'] = inputs['q'] * 1e3
    ref = definition(**inputs, max_CG_iteration=max_CG_step)
    theirs = naive_mesa_net_decoding_one_step(**inputs, max_CG_iteration=max_CG_step)
    for name, x, r in zip(('o', 'h_kk', 'h_kv'), theirs, ref):
        err = rel_err(x, r)
        assert err <= 1e-6, f"{name}: relative error {err:.2e} > 1e-6"


def test_decoding_zero_steps_is_linear_attention():
    # a documented difference: fla's 0 steps return the Jacobi start q / (diag(H) + Λ); here 0 skips the solve (q* = q),
    # as every op of this package does
    inputs = decoding_inputs(1, 2, 16, (0.95, 0.99), torch.float32)
    o, h_kk, h_kv = mesa_net_decoding_one_step(**inputs, max_CG_iteration=0)
    assert rel_err(o, torch.einsum('bhk,bhkv->bhv', inputs['q'].double(), h_kv.double())) <= 1e-6


def test_layer_and_config_take_flas_names():
    from fla.layers import MesaNet as FlaMesaNet
    from fla.models import MesaNetConfig

    from fla_mesa.layers import MesaNet
    from fla_mesa.models import MesaConfig
    for ours, theirs in ((MesaNet, FlaMesaNet), (MesaConfig, MesaNetConfig)):
        missing = set(inspect.signature(theirs.__init__).parameters) - set(inspect.signature(ours.__init__).parameters)
        assert not missing, f"{ours.__name__} lacks fla's {sorted(missing)}"
    layer = MesaNet(hidden_size=32, num_heads=2, head_dim=16, max_cg_step_training=7, max_cg_step_decoding=9)
    assert (layer.cg_max_steps_training, layer.cg_max_steps_inference) == (7, 9)
    config = MesaConfig(max_cg_step_training=7, max_cg_step_decoding=9)
    assert (config.cg_max_steps_training, config.cg_max_steps_inference) == (7, 9)
    assert (config.max_cg_step_training, config.max_cg_step_decoding) == (7, 9)
    # one value each, saved under this package's names
    saved = config.to_dict()
    assert saved['cg_max_steps_training'] == 7 and 'max_cg_step_training' not in saved
    assert MesaConfig.from_dict(saved).cg_max_steps_inference == 9
    # fla's saved config loads as this package's, under this package's model type
    loaded = MesaConfig.from_dict(MesaNetConfig(max_cg_step_training=5).to_dict())
    assert loaded.cg_max_steps_training == 5 and loaded.model_type == 'mesa' and loaded.to_dict()['model_type'] == 'mesa'


def test_no_name_clashes_with_fla_mesa_net():
    # the only names fla-mesa's op modules share with fla's mesa_net modules are the two fla-compatible entry points
    # (same signature and meaning); any other shared name would be one symbol with two meanings
    import importlib
    import pkgutil

    import fla.ops.mesa_net as fla_pkg

    import fla_mesa.ops.mesa as ours_pkg

    def names(pkg):
        out = set()
        for info in pkgutil.iter_modules(pkg.__path__):
            module = importlib.import_module(f'{pkg.__name__}.{info.name}')
            out |= {n for n, obj in vars(module).items()
                    if not n.startswith('_') and getattr(obj, '__module__', None) == module.__name__}
        return out
    assert names(ours_pkg) & names(fla_pkg) == {'chunk_mesa_net', 'mesa_net_decoding_one_step'}
