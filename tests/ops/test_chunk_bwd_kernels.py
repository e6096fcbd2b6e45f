# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The chunk path's backward kernels (`chunk_mesa_bwd_dx`, `chunk_mesa_bwd_grads`) against a float64 reference.

The reference materialises H_t and S_t for every token, solves x_t = (H_t + Λ)⁻¹ q_t and e_t = (H_t + Λ)⁻ᵀ S_t do_t
exactly, and takes autograd gradients of the surrogate L̃ (x, e detached); `test_reference_is_the_true_gradient`
checks once that this equals autograd through `naive_exact_mesa`. The kernels get fp32 copies of the same x, e and
chunk-start states, so what is compared is the kernels' arithmetic alone.

Tolerances: under TRITON_INTERPRET=1 (and with precision='ieee' on a GPU) the products are fp32. The inputs carry
fp32 rounding (6e-8 relative) and every output is an fp32 sum of at most a few hundred products of O(1) terms
(dg included: each of its terms is summed over the decays g_t enters, never as a difference of large sums):
measured relative errors are 1e-7 to 6e-7, we allow 2e-6. Everything is linear in the upstream gradients (do, dht)
with no absolute epsilon, so scaling them by 1e-4 or 1e-8 must leave the relative errors where they are (checked
to within a factor 1.5 of the scale-1 errors). The default precision (tf32x3 on a GPU: three tf32 products, about
fp32) gets 3x the tolerance on a GPU.
"""

import math

import pytest
import torch

from fla.ops.utils import prepare_chunk_indices

from fla_mesa.ops.mesa.chunk_bwd import chunk_mesa_bwd_grads
from fla_mesa.ops.mesa.chunk_o import chunk_mesa_bwd_dx
from fla_mesa.ops.mesa.naive import naive_exact_mesa
from fla_mesa.utils import is_interpreting
from tests.utils import make_inputs, rel_err

pytestmark = pytest.mark.skipif(
    not (is_interpreting() or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a GPU"
)
DEVICE = 'cuda' if torch.cuda.is_available() and not is_interpreting() else 'cpu'
NAMES = ('dk', 'dv', 'dg', 'dbeta', 'dlamb', 'dh0_kk', 'dh0_kv')
TOLS = dict.fromkeys(('dx',) + NAMES, 2e-6)


def _bounds(B, T, cu_seqlens):
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    return [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]


def g_cumsum(g, cu_seqlens, chunk_size):
    """float64 in-chunk cumulative sum of g in log2 space (what fla's chunk_local_cumsum(scale=RCP_LN2) gives)."""
    out = torch.zeros_like(g, dtype=torch.float64)
    B, T = g.shape[:2]
    for b, bos, eos in _bounds(B, T, cu_seqlens):
        for s in range(bos, eos, chunk_size):
            e = min(s + chunk_size, eos)
            out[b, s:e] = g[b, s:e].double().cumsum(0) / math.log(2)
    return out


def reference(q, k, v, g, beta, lamb, h0, do, dht, cu_seqlens, chunk_size):
    """
    float64: x, e, dx = S_t do_t, the chunk-start states, and the autograd gradients of the surrogate
    L̃ = Σ_t [do_t·(S_tᵀ x_t) − e_t·((H_t + Λ) x_t)] + <dht, final state> with x, e detached.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    leaves = [t.detach().double().cpu().requires_grad_() for t in (k, v, g, beta, lamb)]
    k, v, g, beta, lamb = leaves
    h0 = None if h0 is None else [t.detach().double().cpu().requires_grad_() for t in h0]
    q, do = q.double().cpu(), do.double().cpu()
    x = torch.zeros(B, T, H, K, dtype=torch.float64)
    e = torch.zeros(B, T, H, K, dtype=torch.float64)
    dx = torch.zeros(B, T, H, K, dtype=torch.float64)
    h_kk, h_kv = [], []
    loss = 0.
    Lam = torch.diag_embed(lamb)
    for n, (b, bos, eos) in enumerate(_bounds(B, T, cu_seqlens)):
        Hs = torch.zeros(H, K, K, dtype=torch.float64) if h0 is None else h0[0][n]
        Ss = torch.zeros(H, K, V, dtype=torch.float64) if h0 is None else h0[1][n]
        hk, hv = [], []
        for t in range(bos, eos):
            if (t - bos) % chunk_size == 0:
                hk.append(Hs.detach().clone())
                hv.append(Ss.detach().clone())
            kb = k[b, t] * beta[b, t, :, None]
            gamma = g[b, t].exp()[:, None, None]
            Hs = gamma * Hs + kb[:, :, None] * k[b, t, :, None, :]
            Ss = gamma * Ss + kb[:, :, None] * v[b, t, :, None, :]
            A = Hs + Lam
            with torch.no_grad():
                xt = torch.linalg.solve(A, q[b, t])
                dxt = torch.einsum('hkv,hv->hk', Ss, do[b, t])
                et = torch.linalg.solve(A.transpose(-1, -2), dxt)
            x[b, t], dx[b, t], e[b, t] = xt, dxt, et
            loss = loss + (do[b, t] * torch.einsum('hkv,hk->hv', Ss, xt)).sum()
            loss = loss - (et * torch.einsum('hij,hj->hi', A, xt)).sum()
        if dht is not None:
            if dht[0] is not None:
                loss = loss + (dht[0][n].double().cpu() * Hs).sum()
            if dht[1] is not None:
                loss = loss + (dht[1][n].double().cpu() * Ss).sum()
        h_kk.append(torch.stack(hk))
        h_kv.append(torch.stack(hv))
    if cu_seqlens is None:
        h_kk, h_kv = torch.stack(h_kk), torch.stack(h_kv)
    else:
        h_kk, h_kv = torch.cat(h_kk)[None], torch.cat(h_kv)[None]
    inputs = leaves + (h0 or [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    ref = dict(zip(NAMES, grads))
    ref.update(x=x, e=e, dx=dx, h_kk=h_kk, h_kv=h_kv)
    return ref


def make_case(B, T, H, K, V, cu_seqlens=None, initial_state=False, dht=False, gate=(3.0, 1.0), scale=1.0, seed=0):
    q, k, v, g, beta, lamb, h0 = make_inputs(B, T, H, K, V, gate=gate, initial_state=initial_state, seed=seed)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if h0 is not None and cu_seqlens is not None:
        h0 = tuple(h[:1].expand(N, *h.shape[1:]).clone() for h in h0)
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64) * scale
    dh = None
    if dht:
        dh = (torch.randn(N, H, K, K, generator=gen, dtype=torch.float64) * scale,
              torch.randn(N, H, K, V, generator=gen, dtype=torch.float64) * scale)
    return q, k, v, g, beta, lamb, h0, do, dh


def run_kernels(case, ref, cu_seqlens, chunk_size, precision='ieee'):
    q, k, v, g, beta, lamb, h0, do, dht = case
    dev = dict(device=DEVICE, dtype=torch.float32)
    cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    chunk_indices = None if cu is None else prepare_chunk_indices(cu, chunk_size)
    g_cum = g_cumsum(g, cu_seqlens, chunk_size).to(**dev)
    k, v, beta, do, x, e, h_kk, h_kv = (t.to(**dev) for t in (k, v, beta, do, ref['x'], ref['e'], ref['h_kk'], ref['h_kv']))
    h0 = None if h0 is None else tuple(t.to(**dev) for t in h0)
    dht = None if dht is None else tuple(None if t is None else t.to(**dev) for t in dht)
    kw = dict(cu_seqlens=cu, chunk_indices=chunk_indices, chunk_size=chunk_size, precision=precision)
    dx = chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, **kw)
    dk, dv, dg, dbeta, dlamb, dh0 = chunk_mesa_bwd_grads(x, e, do, k, v, g_cum, beta, h_kk, h_kv, initial_state=h0, dht=dht, **kw)
    out = dict(dx=dx, dk=dk, dv=dv, dg=dg, dbeta=dbeta, dlamb=dlamb)
    if h0 is None:
        assert dh0 is None
    else:
        out['dh0_kk'], out['dh0_kv'] = dh0
    return out


def check(out, ref, factor=1.0):
    errs = {name: rel_err(out[name].cpu(), ref[name]) for name in out}
    bad = {n: f"{err:.2e}" for n, err in errs.items() if not err <= TOLS[n] * factor}
    assert not bad, f"relative errors above tolerance: {bad} (all: { {n: f'{v:.1e}' for n, v in errs.items()} })"
    return errs


CASES = {
    # name: (B, T, H, K, V, cu_seqlens, initial_state, dht, gate, chunk_size)
    't1': (2, 1, 2, 32, 16, None, False, False, (3.0, 1.0), 64),
    't63_kv': (2, 63, 2, 48, 40, None, True, False, (3.0, 1.0), 64),
    't130_states': (1, 130, 2, 40, 48, None, True, True, (3.0, 1.0), 64),
    'varlen': (1, 150, 2, 48, 40, [0, 1, 70, 134, 150], True, True, (3.0, 1.0), 64),
    'gates_near_1': (1, 100, 2, 32, 40, None, True, True, (9.0, 0.5), 32),
    'strong_decay_c16': (2, 45, 1, 20, 24, None, False, True, (-1.0, 2.0), 16),
    # more K blocks than V blocks and the other way round (the grads kernel's slices)
    'k72_v16': (1, 70, 1, 72, 16, None, True, True, (3.0, 1.0), 64),
    'k16_v72': (1, 40, 2, 16, 72, None, False, True, (3.0, 1.0), 32),
}


@pytest.mark.parametrize('name', list(CASES))
def test_bwd_kernels(name):
    B, T, H, K, V, cu, h0, dht, gate, C = CASES[name]
    cu = None if cu is None else torch.tensor(cu, dtype=torch.long)
    case = make_case(B, T, H, K, V, cu, h0, dht, gate)
    ref = reference(*case[:7], case[7], case[8], cu, C)
    check(run_kernels(case, ref, cu, C), ref)


def test_upstream_gradient_scale():
    # tiny upstream gradients keep their relative accuracy (no absolute epsilon anywhere)
    cu = torch.tensor([0, 50, 130], dtype=torch.long)
    errs = {}
    for scale in (1.0, 1e-4, 1e-8):
        case = make_case(1, 130, 2, 32, 48, cu, initial_state=True, dht=True, scale=scale)
        ref = reference(*case, cu, 64)
        errs[scale] = check(run_kernels(case, ref, cu, 64), ref)
    for scale in (1e-4, 1e-8):
        for name, err in errs[scale].items():
            assert err <= 1.5 * errs[1.0][name] + 1e-7, f"{name} at scale {scale}: {err:.2e} vs {errs[1.0][name]:.2e}"


def test_default_precision_and_partial_dht():
    # the default operand precision (tf32x3 on GPU) and a final-state gradient for S only
    case = make_case(1, 70, 2, 32, 32, None, initial_state=True, dht=True)
    case = case[:8] + ((None, case[8][1]),)
    ref = reference(*case, None, 64)
    check(run_kernels(case, ref, None, 64, precision=None), ref, factor=1.0 if is_interpreting() else 3.0)


def test_reference_is_the_true_gradient():
    # the surrogate's gradients equal autograd through the exact solve (naive_exact_mesa), and dq = e
    cu = torch.tensor([0, 9, 20], dtype=torch.long)
    case = make_case(1, 20, 2, 8, 6, cu, initial_state=True, dht=True)
    q, k, v, g, beta, lamb, h0, do, dht = case
    ref = reference(*case, cu, 4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta, lamb)]
    h0l = [t.clone().requires_grad_() for t in h0]
    o, ht = naive_exact_mesa(*leaves, initial_state=tuple(h0l), output_final_state=True, cu_seqlens=cu)
    loss = (o * do).sum() + sum((h * d).sum() for h, d in zip(ht, dht))
    grads = torch.autograd.grad(loss, leaves + h0l)
    true = dict(zip(('dq',) + NAMES, grads))
    assert rel_err(ref['e'], true['dq']) < 1e-10
    for name in NAMES:
        assert rel_err(ref[name], true[name]) < 1e-10, name


def test_invalid_precision():
    case = make_case(1, 4, 1, 16, 16)
    q, k, v, g, beta, lamb, h0, do, dht = case
    h_kv = torch.zeros(1, 1, 1, 16, 16)
    with pytest.raises(ValueError, match='precision'):
        chunk_mesa_bwd_dx(do.float(), k.float(), v.float(), g.float(), beta.float(), h_kv, precision='fp64')


@pytest.mark.parametrize('name', ['t63_kv', 'varlen', 'k16_v72'])
def test_adjoint_rhs_formed_in_cg_kernel(name):
    # the backward's adjoint solve forms b = dx = S_t do_t inside the CG kernel (no dx round trip): the same system
    # as the dx kernel's output gives, and the same solution as the float64 reference
    from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
    B, T, H, K, V, cu, h0, dht, gate, C = CASES[name]
    cu = None if cu is None else torch.tensor(cu, dtype=torch.long)
    case = make_case(B, T, H, K, V, cu, h0, dht, gate)
    ref = reference(*case, cu, C)
    _, k, v, g, beta, lamb, _, do, _ = case
    dev = dict(device=DEVICE, dtype=torch.float32)
    cu_d = None if cu is None else cu.to(DEVICE)
    kw = dict(cu_seqlens=cu_d, chunk_indices=None if cu_d is None else prepare_chunk_indices(cu_d, C), chunk_size=C,
              precision='ieee')
    g_cum = g_cumsum(g, cu, C).to(**dev)
    k, v, beta, lamb, do, h_kk, h_kv = (t.to(**dev) for t in (k, v, beta, lamb, do, ref['h_kk'], ref['h_kv']))
    dx = chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, **kw)
    e_dx, n_dx, _ = chunk_mesa_cg(dx, k, g_cum, beta, lamb, h_kk, 3 * K, None, True, **kw)
    e, n, o = chunk_mesa_cg(None, k, g_cum, beta, lamb, h_kk, 3 * K, None, True, v=v, h_kv=h_kv, do=do, **kw)
    assert o is None
    # 3K fixed steps reach the exact solve to fp32 level (the forward kernel tests' criterion), from either
    # right-hand side (they differ in fp32 summation order only)
    assert rel_err(e.cpu(), ref['e']) <= 2e-6
    assert rel_err(e_dx.cpu(), ref['e']) <= 2e-6
    # far past convergence (fp32 underflows: rᵀz, or first pᵀw, reaches 0) every row has stopped, nothing grew
    e_long, n_long, _ = chunk_mesa_cg(None, k, g_cum, beta, lamb, h_kk, 8 * K, None, True, v=v, h_kv=h_kv, do=do, **kw)
    assert rel_err(e_long.cpu(), ref['e']) <= 2e-6 and n_long.max() < 8 * K
    with pytest.raises(ValueError, match='exactly one of `b` and `do`'):
        chunk_mesa_cg(dx, k, g_cum, beta, lamb, h_kk, 3, None, True, v=v, h_kv=h_kv, do=do, **kw)
    with pytest.raises(ValueError, match='`do` needs `v` and `h_kv`'):
        chunk_mesa_cg(None, k, g_cum, beta, lamb, h_kk, 3, None, True, do=do, **kw)


def test_gpu_grads_configs_avoid_miscompiled(monkeypatch):
    # BK = BV = 32, BC = 16 at 8 warps: Triton 3.6 miscompiles it on Hopper with bf16 inputs (inf or an illegal
    # memory access: benchmarks/results/gpu_tests_h200.md); the other five configs give the float64 answer there
    from fla_mesa.ops.mesa import chunk_bwd
    monkeypatch.setattr(chunk_bwd, 'is_interpreting', lambda: False)
    configs = [(c.kwargs['BK'], c.kwargs['BC'], c.num_warps) for c in chunk_bwd._grads_configs()]
    assert configs and (32, 16, 8) not in configs
