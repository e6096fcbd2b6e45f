# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""Legal extreme inputs give exact results (invalid ones are rejected: test_validation.py).

γ = 0 (`g = -inf`, forget everything) is legal; the chunk paths clamp g to `min_log_decay` before their in-chunk
cumulative sums. A sum that large keeps fewer bits of the gates after it in its chunk, so those tokens are off
float64 by a few times the float32 floor (a legal g of -110 costs the same); the bounds below say what was measured.
"""

import inspect
import os

import pytest
import torch

from fla_mesa.ops.mesa import chunk_mesa, fused_recurrent_mesa, naive_chunk_mesa, naive_exact_mesa, naive_recurrent_mesa
from fla_mesa.ops.mesa import chunk as chunk_module
from fla_mesa.ops.mesa.utils import split_cg_steps
from tests.utils import fp32_bound, make_inputs, rel_err, run_with_grads, torch_chunk_path

BACKENDS = ['torch']
if os.environ.get('TRITON_INTERPRET') == '1':
    BACKENDS.append('triton')

B, T, H, K, V, C = 1, 40, 2, 8, 4, 16
# (token, head) pairs with γ = 0: the first token, mid-chunk, a chunk's first and last tokens, the last token
ZERO_DECAY = [(0, 1), (5, 0), (16, 0), (16, 1), (21, 0), (21, 1), (31, 1), (39, 0)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == 'torch':
        torch_chunk_path(monkeypatch)
    return request.param


def zero_decay_inputs(dtype=torch.float64, initial_state=True):
    inputs = make_inputs(B, T, H, K, V, dtype=dtype, initial_state=initial_state)
    for t, h in ZERO_DECAY:
        inputs[3][0, t, h] = float('-inf')
    return inputs


def upstream(seed=3):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dht = (torch.randn(B, H, K, K, generator=gen, dtype=torch.float64),
           torch.randn(B, H, K, V, generator=gen, dtype=torch.float64))
    return do, dht


def to32(inputs):
    return [x.float() if torch.is_tensor(x) else (None if x is None else tuple(h.float() for h in x)) for x in inputs]


@pytest.mark.parametrize('h0', [False, True])
def test_chunk_zero_decay(backend, h0):
    inputs = zero_decay_inputs(initial_state=h0)
    do, dht = upstream()
    ref = run_with_grads(naive_exact_mesa, inputs, do, dht)
    out = run_with_grads(chunk_mesa, to32(inputs), do, dht, cg_tol=None, chunk_size=C)
    # measured worst (dg): 3.4e-6 on the PyTorch path, 6.7e-6 under the interpreter, against 1.8e-7 for the float32
    # exact solve: the gates after a γ = 0 token are summed near min_log_decay (17 bits left after the point)
    bound = 2e-5
    errs = {'o': rel_err(out[0], ref[0]), 'h_kk': rel_err(out[1][0], ref[1][0]), 'h_kv': rel_err(out[1][1], ref[1][1])}
    errs.update({n: rel_err(out[2][n], ref[2][n]) for n in ref[2]})
    assert all(e <= bound for e in errs.values()), errs
    # γ's derivative is 0 where γ is: so is dg, exactly
    t, h = zip(*ZERO_DECAY)
    assert (out[2]['dg'][0, list(t), list(h)] == 0).all()


def test_chunk_zero_decay_float64():
    # float64 runs the PyTorch path, where the clamp (-800) keeps 1e-13 of the gates after it
    inputs = zero_decay_inputs()
    do, dht = upstream()
    ref = run_with_grads(naive_exact_mesa, inputs, do, dht)
    out = run_with_grads(chunk_mesa, inputs, do, dht, cg_tol=None, cg_max_steps=60, chunk_size=C)
    errs = {'o': rel_err(out[0], ref[0])} | {n: rel_err(out[2][n], ref[2][n]) for n in ref[2]}
    assert all(e <= 1e-11 for e in errs.values()), errs


@pytest.mark.parametrize('op', [fused_recurrent_mesa, naive_recurrent_mesa, naive_chunk_mesa],
                         ids=['fused_recurrent', 'naive_recurrent', 'naive_chunk'])
def test_zero_decay_other_paths(op):
    inputs = zero_decay_inputs()
    ref, ref_h = naive_exact_mesa(*inputs, output_final_state=True)
    base, _ = naive_exact_mesa(*to32(inputs))
    kw = dict(chunk_size=C) if op is naive_chunk_mesa else {}
    o, ht = op(*to32(inputs), output_final_state=True, cg_tol=None, **kw)
    # the token-by-token paths never sum the gates: float32 level. naive_chunk is chunk_mesa's PyTorch path (bound
    # as in test_chunk_zero_decay)
    bound = 2e-5 if op is naive_chunk_mesa else fp32_bound(rel_err(base, ref))
    for name, x, y in [('o', o, ref), ('h_kk', ht[0], ref_h[0]), ('h_kv', ht[1], ref_h[1])]:
        assert rel_err(x, y) <= bound, (name, rel_err(x, y), bound)


def test_zero_decay_is_a_restart(backend):
    # after a γ = 0 token the layer is a fresh one started there: the same outputs as a run from that token alone
    q, k, v, g, beta, lamb, _ = to32(make_inputs(B, T, H, K, V))
    g[:, 21] = float('-inf')
    o = chunk_mesa(q, k, v, g, beta, lamb, cg_tol=None, chunk_size=C)[0]
    g_restart = g[:, 21:].clone()
    g_restart[:, 0] = 0
    o_restart = chunk_mesa(*(x[:, 21:] for x in (q, k, v)), g_restart, beta[:, 21:], lamb, cg_tol=None, chunk_size=C)[0]
    # two float32 runs of the same maths, one with its gates summed near min_log_decay (as test_chunk_zero_decay)
    assert rel_err(o[:, 21:], o_restart) <= 2e-5


def test_recurrent_nan_stays_at_its_token():
    # with check_values off (else rejected), a NaN key reaches its own token and later ones only
    q, k, v, g, beta, lamb, _ = to32(make_inputs(B, 20, H, K, V))
    k[0, 12, 0, 0] = float('nan')
    o = fused_recurrent_mesa(q, k, v, g, beta, lamb, check_values=False)[0]
    assert torch.isfinite(o[:, :12]).all() and torch.isnan(o[:, 12:, 0]).all()


# --- no silent failure: tokens that stop without reaching cg_tol are flagged -------------------------------------

def _solve_paths():
    paths = ['fused_recurrent', 'chunk_torch']
    if os.environ.get('TRITON_INTERPRET') == '1':
        paths.append('chunk_triton')
    return paths


def run_flagged(path, q, k, v, g, beta, lamb, cg_max_steps=30, cg_tol=1e-4, flag=True):
    """`(o, x or None, steps, unconverged)` of one path, the steps decoded."""
    from fla_mesa.ops.mesa.chunk_torch import chunk_mesa_fwd_torch
    if path == 'fused_recurrent':
        o, _, steps, unconverged = fused_recurrent_mesa(
            q, k, v, g, beta, lamb, cg_max_steps=cg_max_steps, cg_tol=cg_tol, return_cg_steps=True,
            return_cg_unconverged=True,
        )
        return o, None, steps, unconverged
    if path == 'chunk_torch':
        o, x, steps, _, _ = chunk_mesa_fwd_torch(q, k, v, g, beta, lamb, None, cg_max_steps, cg_tol, True, None, C, flag)
    else:
        from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
        _, g_cum, beta32, h_kk, h_kv, _ = chunk_module._prepare(k, v, g, beta, None, None, C)
        x, steps, o = chunk_mesa_cg(q, k, g_cum, beta32, lamb, h_kk, cg_max_steps, cg_tol, True, chunk_size=C, v=v,
                                    h_kv=h_kv, flag_unconverged=flag)
    return (o, x) + split_cg_steps(steps)


def relative_residual(x, q, k, g, beta, lamb):
    """‖q_t − (H_t + Λ) x_t‖ / ‖q_t‖ per token and head, in float64."""
    q, k, g, beta, lamb, x = (t.double() for t in (q, k, g, beta, lamb, x))
    h = torch.zeros(q.shape[0], q.shape[2], q.shape[3], q.shape[3], dtype=torch.float64)
    res = []
    for t in range(q.shape[1]):
        h = g[:, t].exp()[..., None, None] * h + (beta[:, t, :, None] * k[:, t])[..., :, None] * k[:, t, :, None, :]
        r = q[:, t] - torch.einsum('bhij,bhj->bhi', h, x[:, t]) - lamb * x[:, t]
        res.append(r.norm(dim=-1) / q[:, t].norm(dim=-1))
    return torch.stack(res, 1)


@pytest.mark.parametrize('path', _solve_paths())
def test_tiny_ridge_flagged(path):
    # Λ = 1e-8: H + Λ is nearly singular; CG runs out of steps (or breaks down) on many tokens, and their outputs
    # are far off. Every token not flagged must be as right as cg_tol makes it
    q, k, v, g, beta, lamb, _ = make_inputs(1, 24, 2, 16, 8, dtype=torch.float32)
    lamb = torch.full_like(lamb, 1e-8)
    ref, _ = naive_exact_mesa(*(t.double() for t in (q, k, v, g, beta, lamb)))
    o, _, steps, unconverged = run_flagged(path, q, k, v, g, beta, lamb)
    err = (o.double() - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert unconverged.any() and (steps[unconverged] > 0).all()
    # measured: unflagged at most 4.7e-5 off (fused_recurrent), flagged ones up to 3e4x
    assert err[~unconverged].max() <= 1.5e-4, err[~unconverged].max()
    assert err.max() > 1e-2


@pytest.mark.parametrize('path', [p for p in _solve_paths() if p != 'fused_recurrent'])
@pytest.mark.parametrize('cap', [2, 4, 30])
def test_flag_is_the_residual(path, cap):
    # flagged exactly where the solve stopped above cg_tol: the float64 residual of the returned x says so too
    # (the float32 recurrence tracks it to ~1e-6 here: margins of 2x either side)
    q, k, v, g, beta, lamb, _ = make_inputs(1, 40, 2, 16, 8, dtype=torch.float32)
    tol = 1e-4
    _, x, steps, unconverged = run_flagged(path, q, k, v, g, beta, lamb, cg_max_steps=cap, cg_tol=tol)
    res = relative_residual(x, q, k, g, beta, lamb)
    assert (res[unconverged] > tol / 2).all() and (res[~unconverged] <= 2 * tol).all()
    assert (steps[unconverged] == cap).all()
    if cap == 2:
        assert unconverged.any()
    # decoding gives back the steps of an unflagged run, and the output is the same
    o0, x0, steps0, unconverged0 = run_flagged(path, q, k, v, g, beta, lamb, cg_max_steps=cap, cg_tol=tol, flag=False)
    assert torch.equal(steps, steps0) and torch.equal(x, x0) and not unconverged0.any()


@pytest.mark.parametrize('path', _solve_paths())
def test_no_flags_without_tolerance(path):
    # cg_tol=None asks for fixed steps: nothing to miss
    q, k, v, g, beta, lamb, _ = make_inputs(1, 20, 2, 16, 8, dtype=torch.float32)
    _, _, steps, unconverged = run_flagged(path, q, k, v, g, beta, lamb, cg_max_steps=2, cg_tol=None)
    assert not unconverged.any() and (steps == 2).all()


def test_warn_unconverged():
    import warnings
    q, k, v, g, beta, lamb, _ = make_inputs(1, 12, 2, 16, 8, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r'fused_recurrent_mesa: \d+ of 24 token-heads stopped without reaching cg_tol'):
        fused_recurrent_mesa(q, k, v, g, beta, torch.full_like(lamb, 1e-8), warn_unconverged=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        fused_recurrent_mesa(q, k, v, g, beta, lamb, warn_unconverged=True)


@pytest.mark.skipif('return_cg_unconverged' not in inspect.signature(chunk_mesa).parameters,
                    reason="chunk_mesa does not return the flags yet (issue 14: chunk.py diff)")
def test_chunk_mesa_flags(backend):
    # the op's own API on either path: flags, steps decoded, the warning (Jacobi: 'auto''s second pass is
    # test_auto_precond's)
    q, k, v, g, beta, lamb, _ = make_inputs(1, 24, 2, 16, 8, dtype=torch.float32)
    tiny = torch.full_like(lamb, 1e-8)
    ref, _ = naive_exact_mesa(*(t.double() for t in (q, k, v, g, beta, tiny)))
    with pytest.warns(RuntimeWarning, match=r'chunk_mesa: \d+ of 48 token-heads stopped without reaching cg_tol'):
        o, _, steps, unconverged = chunk_mesa(q, k, v, g, beta, tiny, chunk_size=C, precondition=True,
                                              return_cg_steps=True, return_cg_unconverged=True, warn_unconverged=True)
    err = (o.double() - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert unconverged.any() and (steps >= 0).all() and (steps <= 30).all()
    # as test_tiny_ridge_flagged
    assert err[~unconverged].max() <= 1.5e-4, err[~unconverged].max()
    _, _, steps0 = chunk_mesa(q, k, v, g, beta, tiny, chunk_size=C, precondition=True, return_cg_steps=True)
    assert torch.equal(steps, steps0)
    o, _, unconverged = chunk_mesa(q, k, v, g, beta, lamb, chunk_size=C, return_cg_unconverged=True)
    assert not unconverged.any()


# the chunk op on either path; fused_recurrent_mesa once (`backend` picks chunk_mesa's path only: its 'torch' and
# 'triton' runs of the recurrent kernel were the same run)
@pytest.mark.parametrize('backend, op', [*[pytest.param(b, 'chunk', id=f'{b}-chunk') for b in BACKENDS],
                                         pytest.param('torch', 'fused_recurrent', id='fused_recurrent')],
                         indirect=['backend'])
def test_encoded_steps(backend, op):
    # return_cg_steps='encoded' (what MesaNet keeps): one tensor, the steps with the unconverged tokens as ~n, the
    # same the decoded pair gives; with cg_tol=None nothing is encoded
    q, k, v, g, beta, lamb, _ = make_inputs(1, 24, 2, 16, 8, dtype=torch.float32)
    tiny = torch.full_like(lamb, 1e-8)
    fn = (lambda *x, **kw: chunk_mesa(*x, chunk_size=C, precondition=True, **kw)) if op == 'chunk' else fused_recurrent_mesa
    o, _, steps, unconverged = fn(q, k, v, g, beta, tiny, return_cg_steps=True, return_cg_unconverged=True)
    o_e, _, encoded = fn(q, k, v, g, beta, tiny, return_cg_steps='encoded')
    assert unconverged.any() and encoded.dtype == torch.int32
    assert torch.equal(encoded, torch.where(unconverged, ~steps, steps)) and torch.equal(o_e, o)
    assert torch.equal(split_cg_steps(encoded)[0], steps)
    _, _, plain = fn(q, k, v, g, beta, tiny, cg_max_steps=3, cg_tol=None, return_cg_steps='encoded')
    assert (plain == 3).all()
    with pytest.raises(ValueError, match=r"`return_cg_steps` must be True, False or 'encoded', got 'packed'"):
        fn(q, k, v, g, beta, lamb, return_cg_steps='packed')


def test_chunk_mesa_backward_warns(backend):
    # the adjoint solve has the forward's matrices and stopping rule: with warn_unconverged it warns too (one step
    # cannot reach a relative residual of 1e-6 here; 40 can, K = 16), and the gradients are those without the flag
    import warnings
    q, k, v, g, beta, lamb, _ = make_inputs(1, 24, 2, 16, 8, dtype=torch.float32)
    do = torch.randn_like(v)

    def grads(steps, warn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = chunk_mesa(*leaves, g, beta, lamb, chunk_size=C, cg_max_steps=steps, cg_tol=1e-6, precondition=True,
                       warn_unconverged=warn)[0]
        (o * do).sum().backward()
        return [t.grad for t in leaves]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        flagged = grads(1, True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(m.startswith('chunk_mesa: 48 of 48 token-heads') for m in messages), messages
    assert any(m.startswith('chunk_mesa backward (adjoint solve): 48 of 48 token-heads') for m in messages), messages
    for a, b in zip(flagged, grads(1, False)):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)
        grads(40, True)
