# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The Triton chunk-start factor (`factor.chunk_start_factor_triton`) against `precond.chunk_start_factor` (float64)
and against its definition `W Wᵀ M = I`, under `TRITON_INTERPRET=1` (CI) or on a GPU (inputs moved there).

Bounds, from float32 Cholesky's backward error (u = 2^-24, κ = cond(M)): measured over κ = 10 … 1e8 at K = 32, 64,
‖W Wᵀ M − I‖_F stayed under 0.08 K u κ and ‖W − W_ref‖_F / ‖W_ref‖_F under 0.25 u κ; the tests allow 0.25 K u κ
and u κ.
"""

import pytest
import torch

from fla_mesa.ops.mesa.factor import chunk_start_factor_triton
from fla_mesa.ops.mesa.precond import chunk_end_states, chunk_start_factor
from tests.utils import NEEDS_TRITON, ON_GPU, on_triton

factor = on_triton(chunk_start_factor_triton)
pytestmark = NEEDS_TRITON

U32 = 2.0 ** -24


def spd_inputs(NT, H, K, kappa_max, seed=0):
    """`(h_kk [1, NT, H, K, K], a [1, NT, H], lamb [H, K])` in float32 whose matrices M have condition numbers
    spread from 10 to `kappa_max`; `h_kk` need not be PSD (only M is)."""
    gen = torch.Generator().manual_seed(seed)
    n = NT * H
    q, _ = torch.linalg.qr(torch.randn(n, K, K, generator=gen, dtype=torch.float64))
    kappa = torch.logspace(1, torch.log10(torch.tensor(kappa_max)).item(), n, dtype=torch.float64)
    s = kappa[:, None] ** torch.linspace(0, 1, K, dtype=torch.float64)
    m = (q * s[:, None, :]) @ q.mT
    lamb = torch.rand(H, K, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    h = (m - torch.diag_embed(lamb.repeat(NT, 1))) / a[:, None, None]
    return h.view(1, NT, H, K, K).float(), a.view(1, NT, H).float(), lamb.float()


def form_m(h, a, lamb):
    m = a.double()[..., None, None] * h.double()
    return (m + m.mT) / 2 + torch.diag_embed(lamb.double().expand(*a.shape, h.shape[-1]))


@pytest.mark.parametrize('K, block_size', [(16, 16), (32, 16), (40, 16), (64, 32)])
def test_factor_inverts_m(K, block_size):
    h, a, lamb = spd_inputs(2, 2, K, 1e5)
    w = factor(h, a, lamb, torch.float32, block_size=block_size).double()
    m = form_m(h, a, lamb)
    kappa = torch.linalg.cond(m)
    assert torch.isfinite(w).all()
    assert (w.tril(-1) == 0).all(), "W must be upper triangular"
    assert (w.triu(1) != 0).any(dim=(-1, -2)).all(), "no matrix here may fall back to the diagonal"
    err = (w @ w.mT @ m - torch.eye(K, dtype=torch.float64)).norm(dim=(-1, -2))
    assert (err <= 0.25 * K * U32 * kappa).all(), (err, kappa)
    ref = chunk_start_factor(h, a, lamb, torch.float64)
    diff = (w - ref).norm(dim=(-1, -2)) / ref.norm(dim=(-1, -2))
    assert (diff <= U32 * kappa).all(), (diff, kappa)


def test_factor_only_where_needed_and_listed():
    # with `need`, only the matrices asked for are factorised (bit for bit those of the full call), and with `items`
    # each of them is listed once after the count: the work list of 'auto''s second CG pass
    # (called in place, not through `factor`: `items` is written where it lies)
    device = 'cuda' if ON_GPU else 'cpu'
    h, a, lamb = (x.to(device) for x in spd_inputs(3, 2, 16, 1e3))
    need = torch.tensor([[0, 2], [1, 0], [0, 1]], dtype=torch.int32)
    items = torch.zeros(7, dtype=torch.int32, device=device)
    w = chunk_start_factor_triton(h, a, lamb, torch.float32, need=need.view(1, 3, 2).to(device), items=items).cpu()
    full = chunk_start_factor_triton(h, a, lamb, torch.float32).cpu()
    on = need.view(1, 3, 2) != 0
    assert torch.equal(w[on], full[on])
    assert int(items[0]) == 3 and sorted(items[1:4].tolist()) == [1, 2, 5]


@pytest.mark.parametrize('shape', ['K', 'H K', '1 NT H K', 'NT 1 K'])
def test_factor_lamb_broadcast(shape):
    # Λ of any shape that broadcasts (read in place where its rows repeat along the batch, else copied per matrix):
    # the same W to the bit as Λ given for every matrix, and the right one
    NT, H, K = 3, 2, 16
    h, a, _ = spd_inputs(NT, H, K, 1e3)
    sizes = {'K': K, 'H': H, 'NT': NT, '1': 1}
    lamb = torch.rand(*(sizes[d] for d in shape.split()), generator=torch.Generator().manual_seed(5)) + 0.1
    full = lamb.expand(1, NT, H, K).contiguous()
    w = factor(h, a, lamb, torch.float32)
    assert torch.equal(w, factor(h, a, full, torch.float32))
    # and Λ's own rows: against the float64 factor (κ <= 1e3 here: float32's error is far below the bound)
    ref = chunk_start_factor(h, a, full, torch.float64)
    assert ((w.double() - ref).norm(dim=(-1, -2)) / ref.norm(dim=(-1, -2)) <= 1e-3).all()


def test_factor_falls_back_per_matrix():
    # M indefinite (a 2×2 minor with a negative determinant, positive diagonal) in the first and in the second
    # 16-wide block column: those two matrices get diag(M)^(-1/2), the good one its factor, nothing NaN
    K = 32
    h, a, lamb = spd_inputs(1, 3, K, 100.)
    h, a = h[0, 0], a[0, 0]
    for i, c in ((1, 0), (2, 20)):
        h[i, c, c + 1] = h[i, c + 1, c] = 2 * (h[i, c, c] * h[i, c + 1, c + 1]).abs().sqrt() + 10
    m = form_m(h, a, lamb)
    assert (torch.linalg.cholesky_ex(m).info != 0).tolist() == [False, True, True]
    w = factor(h, a, lamb, torch.bfloat16)
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
    ref = chunk_start_factor(h, a, lamb, torch.float64)
    diag = torch.diag_embed(torch.diagonal(m, dim1=-2, dim2=-1).rsqrt())
    assert torch.allclose(w[1:].double(), diag[1:], rtol=2 ** -8, atol=0)
    assert torch.allclose(ref[1:], diag[1:], rtol=1e-12, atol=0)
    kappa = torch.linalg.cond(m[0])
    assert (w[0].double() - ref[0]).norm() / ref[0].norm() <= U32 * kappa + 2 ** -8


@pytest.mark.parametrize('varlen', [False, True], ids=['dense', 'varlen'])
def test_factor_of_start_and_end_states(varlen):
    # with the final states, M = a (H_c + H_{c+1}) + Λ read in place: H_{c+1} the next chunk's start, or the final
    # state of the chunk's sequence at its last chunk (varlen: sequences of 2, 1 and 3 chunks in one row)
    B, NT, H, K = (1, 6, 2, 32) if varlen else (2, 3, 2, 32)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(B, NT, H, K, 3, generator=gen)
    h = w @ w.mT
    wt = torch.randn(3 if varlen else B, H, K, 3, generator=gen)
    ht = wt @ wt.mT
    lamb = torch.rand(H, K, generator=gen) + 0.1
    chunk_indices = torch.tensor([[0, 0], [0, 1], [1, 0], [2, 0], [2, 1], [2, 2]]) if varlen else None
    ends = chunk_end_states(h, ht, chunk_indices)
    last = [1, 2, 5] if varlen else None
    for c in range(NT):
        for b in range(B):
            seq = (last.index(c) if c in last else None) if varlen else (b if c == NT - 1 else None)
            assert torch.equal(ends[b, c], h[b, c + 1] if seq is None else ht[seq])
    got = factor(h, 0.5, lamb, torch.float32, ht_kk=ht, chunk_indices=chunk_indices).double()
    m = form_m(h + ends, torch.full(h.shape[:3], 0.5), lamb)
    kappa = torch.linalg.cond(m)
    err = (got @ got.mT @ m - torch.eye(K, dtype=torch.float64)).norm(dim=(-1, -2))
    assert (err <= 0.25 * K * U32 * kappa).all(), (err, kappa)
    # against the factor of the start states alone: the end states change every matrix
    alone = factor(h, 0.5, lamb, torch.float32).double()
    assert ((alone - got).norm(dim=(-1, -2)) > 1e-3 * got.norm(dim=(-1, -2))).all()


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(h=torch.zeros(2, 3, 4)), ValueError, r'`h_kk` must be \[\.\.\., K, K\], got shape \(2, 3, 4\)'),
    (dict(h=torch.zeros(2, 130, 130), a=torch.ones(2), lamb=torch.ones(130)), ValueError, r'K <= 128, got K = 130'),
    (dict(a=torch.ones(3)), ValueError, r'`a` must have shape \(2,\) \(h_kk\'s batch\), got \(3,\)'),
    (dict(lamb=torch.ones(3)), ValueError, r'`lamb` must broadcast to \(2, 4\), got shape \(3,\)'),
    (dict(a=torch.ones(2, dtype=torch.long)), TypeError, r'`a` must be a floating tensor, got torch.int64'),
    (dict(precision='fp8'), ValueError, r"`precision` must be one of .*, got 'fp8'"),
    (dict(block_size=64), ValueError, r'`block_size` must be 16 or 32, got 64'),
    (dict(a='x'), TypeError, r'`a` must be a tensor or a number, got str'),
    (dict(ht_kk=torch.zeros(2, 4, 4)), ValueError, r'with `ht_kk`, `h_kk` must be \[B, NT, H, K, K\], got shape \(2, 4, 4\)'),
    (dict(h=torch.eye(4).repeat(1, 2, 1, 1, 1), a=torch.ones(1, 2, 1), ht_kk=torch.zeros(2, 1, 4, 4)), ValueError,
     r'`ht_kk` must be \[N, H, K, K\] with H, K = 1, 4 \(N = 1 without chunk_indices\), got shape \(2, 1, 4, 4\)'),
    (dict(h=torch.eye(4).repeat(2, 2, 1, 1, 1), a=torch.ones(2, 2, 1), ht_kk=torch.zeros(2, 1, 4, 4),
          chunk_indices=torch.zeros(2, 2, dtype=torch.long)), ValueError,
     r'`chunk_indices` must be \[NT, 2\] = \[2, 2\] with B = 1, got \(2, 2\) with B = 2'),
    (dict(items=torch.zeros(3, dtype=torch.int32)), ValueError, r'`items` must be 3 int32 on cpu with `need`, got '
     r'torch.int32 \(3,\) on cpu without `need`'),
    (dict(need=torch.ones(2, dtype=torch.int32), items=torch.zeros(2, dtype=torch.int32)), ValueError,
     r'`items` must be 3 int32 on cpu with `need`, got torch.int32 \(2,\) on cpu$'),
])
def test_factor_bad_args(kwargs, error, match):
    args = dict(h=torch.eye(4).repeat(2, 1, 1), a=torch.ones(2), lamb=torch.ones(4))
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ('precision', 'block_size', 'ht_kk', 'chunk_indices', 'need', 'items') if k in args}
    with pytest.raises(error, match=match):
        chunk_start_factor_triton(args['h'], args['a'], args['lamb'], torch.float32, **extra)
