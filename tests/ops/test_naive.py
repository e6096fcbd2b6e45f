# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The references: the exact solve against an independent closed form, and both CG references against it."""

import pytest
import torch

from fla_mesa.ops.mesa import naive_chunk_mesa, naive_exact_mesa, naive_recurrent_mesa
from fla_mesa.ops.mesa.solver import cg_solve
from tests.utils import assert_rel, make_inputs


def closed_form(q, k, v, g, beta, lamb, h0):
    # H_t = Σ_s ζ_ts β_s k_s k_sᵀ + ζ_t0 H_0 as an explicit sum (no recurrence), solved with an explicit inverse
    B, T, H, K = q.shape
    G = g.cumsum(1)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for t in range(T):
        zeta = (G[:, t:t + 1] - G[:, :t + 1]).exp() * beta[:, :t + 1]
        Ht = torch.einsum('bsh,bshi,bshj->bhij', zeta, k[:, :t + 1], k[:, :t + 1])
        St = torch.einsum('bsh,bshi,bshj->bhij', zeta, k[:, :t + 1], v[:, :t + 1])
        if h0 is not None:
            Ht = Ht + G[:, t].exp()[..., None, None] * h0[0]
            St = St + G[:, t].exp()[..., None, None] * h0[1]
        x = torch.einsum('bhij,bhj->bhi', torch.linalg.inv(Ht + torch.diag_embed(lamb)), q[:, t])
        o[:, t] = torch.einsum('bhij,bhi->bhj', St, x)
    return o, (Ht, St)


@pytest.mark.parametrize('initial_state', [False, True])
@pytest.mark.parametrize('B,T,H,K,V', [(1, 1, 1, 4, 4), (2, 9, 2, 5, 3)])
def test_exact_matches_closed_form(B, T, H, K, V, initial_state):
    inputs = make_inputs(B, T, H, K, V, initial_state=initial_state)
    o, ht = naive_exact_mesa(*inputs, output_final_state=True)
    o_ref, ht_ref = closed_form(*inputs)
    assert_rel('o', o, o_ref, 1e-12)
    assert_rel('h_kk', ht[0], ht_ref[0], 1e-12)
    assert_rel('h_kv', ht[1], ht_ref[1], 1e-12)


@pytest.mark.parametrize('precondition', [False, True])
@pytest.mark.parametrize('gate', [(3.0, 1.0), (7.0, 0.1)], ids=['gamma~0.95', 'gamma~0.999'])
@pytest.mark.parametrize('B,T,H,K,V,C', [(1, 1, 1, 8, 8, 16), (2, 63, 2, 8, 5, 16), (1, 130, 1, 16, 16, 64)])
def test_cg_references_match_exact(B, T, H, K, V, C, gate, precondition):
    # float64 and more steps than K: CG has converged, so both references equal the exact solve
    inputs = make_inputs(B, T, H, K, V, gate=gate, initial_state=True)
    o_ref, ht_ref = naive_exact_mesa(*inputs, output_final_state=True)
    kw = dict(output_final_state=True, cg_max_steps=3 * K, cg_tol=None, precondition=precondition)
    for name, (o, ht) in [
        ('recurrent', naive_recurrent_mesa(*inputs, **kw)),
        ('chunk', naive_chunk_mesa(*inputs, chunk_size=C, **kw)),
    ]:
        assert_rel(f'{name} o', o, o_ref, 1e-6)
        assert_rel(f'{name} h_kk', ht[0], ht_ref[0], 1e-12)
        assert_rel(f'{name} h_kv', ht[1], ht_ref[1], 1e-12)


def test_cg_tol_and_step_counts():
    inputs = make_inputs(2, 40, 2, 16, 8, gate=(5.0, 0.5))
    o_ref, _ = naive_exact_mesa(*inputs)
    errs, means = [], []
    for tol in (1e-2, 1e-4, 1e-8):
        o, _, steps = naive_chunk_mesa(*inputs, cg_max_steps=100, cg_tol=tol, return_cg_steps=True, chunk_size=16)
        o2, _, steps2 = naive_recurrent_mesa(*inputs, cg_max_steps=100, cg_tol=tol, return_cg_steps=True)
        assert steps.dtype == torch.int32 and steps.shape == (2, 40, 2)
        # same solver, same rule: chunkwise and token-by-token agree on every token's count but for rounding ties
        assert (steps - steps2).abs().max() <= 1
        errs.append(((o - o_ref).norm() / o_ref.norm()).item())
        means.append(steps.float().mean().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-7
    assert means[0] < means[1] < means[2] <= 16 + 1
    # no tolerance: every row runs cg_max_steps (well above the float64 residual floor after 4 of them)
    _, _, fixed = naive_chunk_mesa(*inputs, cg_max_steps=4, cg_tol=None, return_cg_steps=True)
    assert (fixed == 4).all()


def test_solver_scale_invariant_and_zero_rhs():
    torch.manual_seed(0)
    a = torch.randn(6, 10, 10, dtype=torch.float64)
    A = a @ a.transpose(-1, -2) + 0.5 * torch.eye(10, dtype=torch.float64)
    b = torch.randn(6, 10, dtype=torch.float64)
    b[2] = 0

    def matvec(p):
        return torch.einsum('nij,nj->ni', A, p)

    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    x1, s1 = cg_solve(matvec, b, diag, 25, 1e-6, True)
    for scale in (1e-30, 1e-8, 1e8):
        xs, ss = cg_solve(matvec, b * scale, diag, 25, 1e-6, True)
        assert torch.equal(ss, s1)
        assert_rel(f'x at scale {scale}', xs / scale, x1, 1e-11)
    assert (x1[2] == 0).all() and s1[2] == 0
    assert_rel('x', x1, torch.linalg.solve(A, b), 1e-5)


def test_solver_rounded_directions():
    # round_p (the kernel's rounded directions): x and r move along the rounded vector, so r stays b - Ax and the
    # float32 solve reaches the plain one's accuracy against float64 (within 1.5x, floor 1e-6), in a few more steps
    torch.manual_seed(0)
    a = torch.randn(64, 32, 32, dtype=torch.float64)
    A = a @ a.transpose(-1, -2) / 32 + 0.5 * torch.eye(32, dtype=torch.float64)
    b = torch.randn(64, 32, dtype=torch.float64)
    exact = torch.linalg.solve(A, b)
    A32, b32 = A.float(), b.float()

    def matvec(p):
        return torch.einsum('nij,nj->ni', A32, p)

    diag = torch.diagonal(A32, dim1=-2, dim2=-1)
    x, steps = cg_solve(matvec, b32, diag, 100, None, True)
    xr, steps_r = cg_solve(matvec, b32, diag, 100, None, True, round_p=lambda t: t.bfloat16().float())
    err, err_r = (((y.double() - exact).norm() / exact.norm()).item() for y in (x, xr))
    assert err_r <= max(1.5 * err, 1e-6), f"{err_r:.2e} vs {err:.2e}"
    assert not torch.equal(xr, x) and steps.float().mean() <= steps_r.float().mean() <= 1.3 * steps.float().mean()
