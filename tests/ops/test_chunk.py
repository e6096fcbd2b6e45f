# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""`chunk_mesa`, forward and implicit backward, against the float64 exact solve.

Tolerances follow FlashAttention's rule: in float32 an output or gradient may be off the float64 truth by at most
twice what the exact reference itself loses when run in float32 (a dense `torch.linalg.solve`), with a floor of
3e-7 (`tests/utils.FP32_FLOOR`) for cases where that reference happens to be nearly exact. Runs with `cg_tol=1e-4`
are checked against the error the tolerance allows, `κ(A)·1e-4`, bounded here by 2e-3.
"""

import os

import pytest
import torch

from fla_mesa.ops.mesa import chunk_mesa, naive_exact_mesa
from fla_mesa.ops.mesa.chunk_torch import chunk_mesa_fwd_torch
from tests.utils import bf16_floor, fp32_bound, make_inputs, on_cuda, rel_err, run_with_grads, torch_chunk_path

BACKENDS = ['torch']
if os.environ.get('TRITON_INTERPRET') == '1':
    BACKENDS.append('triton')
elif torch.cuda.is_available():
    # the Triton kernels on a GPU: the same tests, inputs moved there and results back (`on_cuda`)
    BACKENDS.append('cuda')
_chunk_mesa = chunk_mesa


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == 'torch':
        torch_chunk_path(monkeypatch)
    if request.param == 'cuda':
        monkeypatch.setitem(globals(), 'chunk_mesa', on_cuda(_chunk_mesa))
    return request.param


def upstream(B, T, H, V, K, scale, seed=7):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64) * scale
    dht = (torch.randn(B, H, K, K, generator=gen, dtype=torch.float64) * scale,
           torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) * scale)
    return do, dht


def compare(inputs64, do, dht, backend_kwargs, scale_note=''):
    """Errors of chunk_mesa in float32 and of the exact reference in float32, both against float64."""
    ref = run_with_grads(naive_exact_mesa, inputs64, do, dht)
    inputs32 = [x.float() if torch.is_tensor(x) else (None if x is None else tuple(h.float() for h in x)) for x in inputs64]
    base = run_with_grads(naive_exact_mesa, inputs32, do, dht)
    out = run_with_grads(chunk_mesa, inputs32, do, dht, **backend_kwargs)
    names = ['o', 'h_kk', 'h_kv'] + list(ref[2])
    flat = [lambda r: r[0], lambda r: r[1][0], lambda r: r[1][1]] + [lambda r, n=n: r[2][n] for n in ref[2]]
    return {n: (rel_err(f(out), f(ref)), rel_err(f(base), f(ref))) for n, f in zip(names, flat)}


CASES = [
    # B, T, H, K, V, chunk, gate (mu, sigma of the pre-sigmoid), initial state
    (1, 1, 1, 16, 16, 16, (3.0, 1.0), False),
    (2, 63, 2, 16, 8, 16, (3.0, 1.0), True),
    (1, 130, 2, 8, 24, 64, (3.0, 1.0), False),
    (1, 70, 1, 16, 16, 32, (8.0, 0.1), True),
]


@pytest.mark.parametrize('precondition', [False, True])
@pytest.mark.parametrize('B,T,H,K,V,C,gate,h0', [pytest.param(*c, id='B{}-T{}-H{}-K{}-V{}-C{}-{}-h0{}'.format(*c)) for c in CASES])
def test_chunk_fp32_matches_float64(backend, B, T, H, K, V, C, gate, h0, precondition):
    inputs = make_inputs(B, T, H, K, V, gate=gate, initial_state=h0)
    do, dht = upstream(B, T, H, V, K, 1.0)
    kw = dict(cg_max_steps=3 * K, cg_tol=1e-7, precondition=precondition, chunk_size=C)
    for name, (err, base) in compare(inputs, do, dht, kw).items():
        assert err <= fp32_bound(base, backend == 'cuda'), f"{name}: {err:.2e} vs fp32 exact reference {base:.2e}"


@pytest.mark.parametrize('scale', [1.0, 1e-8])
def test_chunk_gradients_scale_invariant(backend, scale):
    # the gradients' relative accuracy must not depend on the size of the upstream gradient (an absolute epsilon or
    # floor anywhere shows most at the smaller scale: 1e-8 checks what 1e-4 did, more strictly)
    inputs = make_inputs(1, 50, 2, 16, 16, gate=(6.0, 0.5), initial_state=True)
    do, dht = upstream(1, 50, 2, 16, 16, scale)
    kw = dict(cg_max_steps=48, cg_tol=1e-7, chunk_size=16)
    for name, (err, base) in compare(inputs, do, dht, kw).items():
        assert err <= fp32_bound(base, backend == 'cuda'), f"scale {scale} {name}: {err:.2e} vs fp32 exact reference {base:.2e}"


@pytest.mark.parametrize('scale', [1.0, 1e-8])
def test_chunk_plain_directions(backend, monkeypatch, scale):
    # CG_ROUND_DIRECTIONS = False: the forward's and the adjoint's CG with unrounded directions (the other tests
    # run the default, rounded ones), fp32 level as above
    if backend == 'torch':
        pytest.skip('an option of the Triton CG kernel')
    from fla_mesa.ops.mesa import chunk_cg
    monkeypatch.setattr(chunk_cg, 'CG_ROUND_DIRECTIONS', False)
    inputs = make_inputs(1, 63, 2, 16, 8, gate=(6.0, 1.0), initial_state=True)
    do, dht = upstream(1, 63, 2, 8, 16, scale)
    kw = dict(cg_max_steps=48, cg_tol=1e-7, chunk_size=32)
    for name, (err, base) in compare(inputs, do, dht, kw).items():
        assert err <= fp32_bound(base, backend == 'cuda'), f"{name}: {err:.2e} vs fp32 exact reference {base:.2e}"


def test_chunk_qk_l2norm_in_kernel(backend):
    # q and k normalised inside the op (fla's public L2Norm on the Triton path), every gradient through it; q, k not
    # unit-norm, so a skipped or doubled normalisation fails
    inputs = make_inputs(1, 40, 2, 16, 8, gate=(3.0, 1.0), initial_state=True)
    inputs[0], inputs[1] = inputs[0] * 3.0, inputs[1] * 0.5
    do, dht = upstream(1, 40, 2, 8, 16, 1.0)
    norm = dict(use_qk_l2norm_in_kernel=True)
    ref = run_with_grads(naive_exact_mesa, inputs, do, dht, **norm)
    inputs32 = [x.float() if torch.is_tensor(x) else tuple(h.float() for h in x) for x in inputs]
    base = run_with_grads(naive_exact_mesa, inputs32, do, dht, **norm)
    out = run_with_grads(chunk_mesa, inputs32, do, dht, cg_max_steps=48, cg_tol=1e-7, chunk_size=16, **norm)
    for name in ['o'] + list(ref[2]):
        pick = (lambda r: r[0]) if name == 'o' else (lambda r, n=name: r[2][n])
        err, floor = rel_err(pick(out), pick(ref)), rel_err(pick(base), pick(ref))
        assert err <= fp32_bound(floor, backend == 'cuda'), f"{name}: {err:.2e} vs fp32 exact reference {floor:.2e}"


@pytest.mark.parametrize('precondition', [False, True])
def test_chunk_cg_tol(backend, precondition):
    inputs = make_inputs(1, 64, 2, 32, 16, gate=(5.0, 1.0))
    do, dht = upstream(1, 64, 2, 16, 32, 1e-6)
    errs = compare(inputs, do, dht, dict(cg_max_steps=30, cg_tol=1e-4, precondition=precondition))
    for name, (err, _) in errs.items():
        assert err <= 2e-3, f"{name}: {err:.2e}"
    inputs32 = [x.float() if torch.is_tensor(x) else x for x in inputs]
    _, _, steps = chunk_mesa(*inputs32, cg_max_steps=30, cg_tol=1e-4, precondition=precondition, return_cg_steps=True)
    assert 1 <= steps.float().mean() < 30 and steps.max() <= 30


def test_chunk_gradcheck():
    # float64, converged CG: the implicit backward is the derivative of the forward
    q, k, v, g, beta, lamb, (h_kk, h_kv) = make_inputs(1, 11, 1, 4, 3, gate=(3.0, 0.5), initial_state=True)
    g = g.clamp_max(-1e-3)

    def fn(q, k, v, g, beta, lamb, h_kk, h_kv):
        o, (a, b) = chunk_mesa(q, k, v, g, beta, lamb, (h_kk, h_kv), output_final_state=True,
                               cg_max_steps=20, cg_tol=None, chunk_size=16)
        return o, a, b

    args = [t.clone().requires_grad_() for t in (q, k, v, g, beta, lamb, h_kk, h_kv)]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_chunk_varlen_equals_per_sequence(backend):
    cu = torch.tensor([0, 1, 20, 40], dtype=torch.int32)
    N, T = len(cu) - 1, int(cu[-1])
    q, k, v, g, beta, lamb, _ = make_inputs(1, T, 2, 16, 8, dtype=torch.float32)
    # a different initial state per sequence: a sequence started from another's state must fail
    h0 = make_inputs(N, 1, 2, 16, 8, dtype=torch.float32, initial_state=True, seed=3)[6]
    do, _ = upstream(1, T, 2, 8, 16, 1e-3)
    kw = dict(cg_max_steps=48, cg_tol=1e-7, chunk_size=16)
    o, ht, grads = run_with_grads(chunk_mesa, [q, k, v, g, beta, lamb, h0], do, cu_seqlens=cu, **kw)
    for i in range(N):
        s = slice(int(cu[i]), int(cu[i + 1]))
        inp = [x[:, s] for x in (q, k, v, g, beta)] + [lamb, tuple(h[i:i + 1] for h in h0)]
        o_i, ht_i, grads_i = run_with_grads(chunk_mesa, inp, do[:, s], **kw)
        assert rel_err(o[:, s], o_i) < 1e-5
        assert rel_err(ht[0][i], ht_i[0][0]) < 1e-5 and rel_err(ht[1][i], ht_i[1][0]) < 1e-5
        for name in ('dq', 'dk', 'dv', 'dg', 'dbeta'):
            assert rel_err(grads[name][:, s], grads_i[name]) < 1e-5, name
        assert rel_err(grads['dh0_kk'][i], grads_i['dh0_kk'][0]) < 1e-5
        assert rel_err(grads['dh0_kv'][i], grads_i['dh0_kv'][0]) < 1e-5


def test_chunk_state_carry_equals_whole(backend):
    q, k, v, g, beta, lamb, h0 = make_inputs(1, 90, 2, 16, 12, dtype=torch.float32, initial_state=True)
    kw = dict(cg_max_steps=48, cg_tol=1e-7, chunk_size=32, output_final_state=True)
    o, ht = chunk_mesa(q, k, v, g, beta, lamb, h0, **kw)
    o1, h1 = chunk_mesa(*(x[:, :37] for x in (q, k, v, g, beta)), lamb, h0, **kw)
    o2, h2 = chunk_mesa(*(x[:, 37:] for x in (q, k, v, g, beta)), lamb, h1, **kw)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-5
    assert rel_err(h2[0], ht[0]) < 1e-6 and rel_err(h2[1], ht[1]) < 1e-6


def test_chunk_no_solve_is_gla(backend):
    # cg_max_steps=0: q* = q, so o_t = S_tᵀ q_t, and Λ gets no gradient
    q, k, v, g, beta, lamb, _ = make_inputs(1, 40, 2, 8, 8, dtype=torch.float32)
    o, (_, S) = chunk_mesa(q, k, v, g, beta, lamb, output_final_state=True, cg_max_steps=0, chunk_size=16)
    assert rel_err(o[:, -1], torch.einsum('bhk,bhkv->bhv', q[:, -1], S)) < 1e-6
    lamb = lamb.clone().requires_grad_()
    chunk_mesa(q, k, v, g, beta, lamb, cg_max_steps=0)[0].sum().backward()
    assert (lamb.grad == 0).all()


def test_chunk_no_solve_bf16_inputs(backend):
    # with bf16 q, k, v the 0-step forward runs fla's chunk_fwd_o (float32 inputs take the PyTorch path): against the
    # float64 PyTorch path on the same rounded inputs: o's bf16 rounding (1.7e-3 here) plus room for tf32 products
    inputs = make_inputs(2, 70, 2, 16, 8, initial_state=True)
    q, k, v = (x.bfloat16() for x in inputs[:3])
    rest = [x.float() for x in inputs[3:6]]
    h0 = tuple(h.float() for h in inputs[6])
    o, _ = chunk_mesa(q, k, v, *rest, h0, cg_max_steps=0, chunk_size=32)
    assert o.dtype == torch.bfloat16
    ref = chunk_mesa_fwd_torch(*(x.double() for x in (q, k, v, *rest)), tuple(h.double() for h in h0), 0, None, False, None, 32)[0]
    assert rel_err(o, ref) < 4e-3


def test_chunk_bf16_inputs(backend):
    # against the float64 exact solve of the same bf16-rounded inputs: within 1.5x the rounding of the exact output
    # to bf16 (the CG kernel stores o in bf16, by truncation under the interpreter)
    inputs = make_inputs(1, 64, 2, 32, 32, initial_state=True)
    inputs[:3] = [x.bfloat16().double() for x in inputs[:3]]
    ref, _ = naive_exact_mesa(*inputs)
    q, k, v = (x.bfloat16() for x in inputs[:3])
    o, _ = chunk_mesa(q, k, v, *(x.float() for x in inputs[3:6]), inputs[6] and tuple(h.float() for h in inputs[6]))
    assert o.dtype == torch.bfloat16
    floor = bf16_floor(ref, truncated=backend == 'triton')
    assert rel_err(o, ref) <= 1.5 * floor, f"{rel_err(o, ref):.2e} vs bf16 rounding {floor:.2e}"


@pytest.mark.parametrize('scale', [1.0, 1e-8])
def test_chunk_bf16_inputs_gradients(backend, scale):
    """
    bf16 q, k, v (the kernels' 'auto' precision is bf16x3 then): against the float64 exact solve of the same rounded
    inputs and upstream gradients, every bf16 result (o, dq, dk, dv) within 1.5x the error of rounding the exact one
    to bf16, and the fp32 results (dg, dβ, dλ, states) within 1e-4 (~3e-5 measured). Fixed steps: cg_tol's error is
    not what this checks.
    """
    inputs = make_inputs(1, 70, 2, 32, 16, initial_state=True, gate=(5.0, 1.0), seed=3)
    inputs[:3] = [x.bfloat16() for x in inputs[:3]]
    do, dht = upstream(1, 70, 2, 16, 32, scale)
    do = do.bfloat16().double()
    ref = run_with_grads(naive_exact_mesa, [x.double() if torch.is_tensor(x) else tuple(h for h in x)
                                            for x in inputs], do, dht)
    inputs32 = inputs[:3] + [x.float() for x in inputs[3:6]] + [tuple(h.float() for h in inputs[6])]
    out = run_with_grads(chunk_mesa, inputs32, do, dht, cg_max_steps=40, cg_tol=None)
    pairs = [('o', out[0], ref[0])] + [(n, out[2][n], ref[2][n]) for n in ref[2]]
    pairs += [('h_kk', out[1][0], ref[1][0]), ('h_kv', out[1][1], ref[1][1])]
    for name, x, r in pairs:
        if x.dtype == torch.bfloat16:
            bound = 1.5 * rel_err(r.bfloat16(), r)
        else:
            bound = 1e-4
        assert rel_err(x, r) <= bound, f"{name} at scale {scale}: {rel_err(x, r):.2e} > {bound:.2e}"


def test_chunk_fixed_steps_past_convergence(backend):
    # 60 fixed steps on K = 16 in float32: rᵀz underflows long before the last step; nothing may turn NaN
    inputs = make_inputs(1, 40, 2, 16, 16, initial_state=True)
    ref, _ = naive_exact_mesa(*inputs)
    inputs32 = [x.float() if torch.is_tensor(x) else tuple(h.float() for h in x) for x in inputs]
    bound = fp32_bound(rel_err(naive_exact_mesa(*inputs32)[0], ref), backend == 'cuda')
    for precondition in (False, True):
        o, _ = chunk_mesa(*inputs32, cg_max_steps=60, cg_tol=None, precondition=precondition)
        assert rel_err(o, ref) <= bound, f"precondition={precondition}: {rel_err(o, ref):.2e} > {bound:.2e}"


def test_chunk_under_torch_compile():
    # the op is a graph break (@torch.compiler.disable, as in fla): a compiled caller gets the eager result
    q, k, v, g, beta, lamb, _ = make_inputs(1, 20, 1, 8, 8, dtype=torch.float32)

    def f(q, k, v, g, beta, lamb):
        return chunk_mesa(q * 2, k, v, g, beta, lamb, chunk_size=16)[0] + 1

    compiled = torch.compile(f, backend='eager')
    assert torch.equal(compiled(q, k, v, g, beta, lamb), f(q, k, v, g, beta, lamb))
