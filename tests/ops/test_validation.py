# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""Bad arguments raise a ValueError/TypeError that names the argument and shows the values."""

import pytest
import torch

from fla_mesa.ops.mesa import chunk_mesa, fused_recurrent_mesa
from tests.utils import make_inputs

OPS = [chunk_mesa] + ([fused_recurrent_mesa] if fused_recurrent_mesa is not None else [])


def good():
    q, k, v, g, beta, lamb, h0 = make_inputs(2, 5, 2, 4, 3, dtype=torch.float32, initial_state=True)
    return dict(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb, initial_state=h0)


def replace(name, value):
    kw = good()
    kw[name] = value(kw) if callable(value) else value
    return kw


BAD = [
    ('q', lambda kw: kw['q'][0], ValueError, r'`q` must have shape \[B, T, H, K\], got \(5, 2, 4\)'),
    ('k', lambda kw: kw['k'][:, :4], ValueError, r'`k` must have the shape of `q`'),
    ('v', lambda kw: kw['v'][:, :, :1], ValueError, r'`v` must have shape \[B, T, H, V\] = \[2, 5, 2, V\], got \(2, 5, 1, 3\)'),
    ('g', lambda kw: kw['g'][..., None], ValueError, r'`g` must have shape \[B, T, H\] = \(2, 5, 2\)'),
    ('beta', lambda kw: kw['beta'][:1], ValueError, r'`beta` must have shape'),
    ('lamb', lambda kw: kw['lamb'][:, :3], ValueError, r'`lamb` must have shape \[H, K\] = \(2, 4\), got \(2, 3\)'),
    ('lamb', lambda kw: kw['lamb'] * 0, ValueError, r'`lamb` must be positive and finite everywhere, got min\(lamb\) = 0'),
    ('lamb', lambda kw: kw['lamb'] / 0, ValueError, r'`lamb` must be positive and finite .* max\(lamb\) = inf'),
    ('lamb', lambda kw: kw['lamb'] - 10, ValueError, r'`lamb` must be positive'),
    ('g', lambda kw: kw['g'] + 1, ValueError, r'`g` is a log-decay and must be <= 0'),
    ('g', lambda kw: kw['g'] * float('nan'), ValueError, r'`g` is a log-decay .* nan'),
    ('beta', lambda kw: kw['beta'] - 0.5, ValueError, r'`beta` must be >= 0 and finite everywhere, got min\(beta\) = -0\.4'),
    ('beta', lambda kw: kw['beta'].index_fill(1, torch.tensor([3]), float('nan')), ValueError, r'`beta` must be >= 0 .* nan'),
    ('beta', lambda kw: kw['beta'] / 0, ValueError, r'`beta` must be >= 0 and finite .* max\(beta\) = inf'),
    ('q', lambda kw: kw['q'].index_fill(1, torch.tensor([3]), float('nan')), ValueError, r'`q` must be finite everywhere, got min\(q\) = nan'),
    ('k', lambda kw: kw['k'].index_fill(1, torch.tensor([4]), float('inf')), ValueError, r'`k` must be finite everywhere, .* max\(k\) = inf'),
    ('v', lambda kw: kw['v'].index_fill(1, torch.tensor([0]), float('-inf')), ValueError, r'`v` must be finite everywhere, got min\(v\) = -inf'),
    ('g', lambda kw: kw['g'].index_fill(1, torch.tensor([2]), float('inf')), ValueError, r'`g` is a log-decay .* max\(g\) = inf'),
    # head-first q, k, v (the layout of fla's old `head_first=True`): the error names the layout, not `g`
    ('q', lambda kw: kw['q'].transpose(1, 2), ValueError, r'`q`, `k`, `v` look head-first \[B, H, T, K\]: q \(2, 2, 5, 4\)'),
    ('q', lambda kw: kw['q'].long(), TypeError, r'`q` must be a floating-point tensor, got dtype torch.int64'),
    ('q', lambda kw: kw['q'].numpy(), TypeError, r'`q` must be a torch.Tensor, got ndarray'),
    ('initial_state', lambda kw: kw['initial_state'][0], TypeError, r'`initial_state` must be a pair'),
    ('initial_state', lambda kw: (kw['initial_state'][0][:1], kw['initial_state'][1]), ValueError,
     r'`initial_state` h_kk must have shape \(2, 2, 4, 4\) \(N = 2 = batch size\), got \(1, 2, 4, 4\)'),
    ('initial_state', lambda kw: (kw['initial_state'][0], kw['initial_state'][1][..., :2]), ValueError,
     r'`initial_state` h_kv must have shape \(2, 2, 4, 3\)'),
    ('initial_state', lambda kw: (kw['initial_state'][0].half(), kw['initial_state'][1]), TypeError,
     r'`initial_state` h_kk must be float32'),
]


@pytest.mark.parametrize('op', OPS)
@pytest.mark.parametrize('name,value,exc,match', BAD, ids=[f'{b[0]}-{i}' for i, b in enumerate(BAD)])
def test_bad_inputs(op, name, value, exc, match):
    with pytest.raises(exc, match=match):
        kw = replace(name, value)
        if 'head-first' in match:
            kw['k'], kw['v'] = kw['k'].transpose(1, 2), kw['v'].transpose(1, 2)
        op(**kw)


@pytest.mark.parametrize('op', OPS)
def test_head_first_everything(op):
    # q, k, v, g and beta all head-first: only lamb [H, K] gives the layout away
    kw = good()
    for n in ('q', 'k', 'v', 'g', 'beta'):
        kw[n] = kw[n].transpose(1, 2)
    with pytest.raises(ValueError, match=r'`q`, `k`, `v` look head-first'):
        op(**kw)


@pytest.mark.parametrize('op', OPS)
def test_value_checks_one_sync(op, monkeypatch):
    # every data check in one device-to-host copy (a sync on a GPU): count the reads of tensors back to the host
    reads = []
    for name in ('tolist', 'item'):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, orig=orig, name=name: reads.append(name) or orig(self, *a))
    op(**good())
    assert reads == ['tolist']
    reads.clear()
    op(**good(), check_values=False)
    assert reads == []


@pytest.mark.parametrize('op', OPS)
@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(cg_max_steps=-1), ValueError, r'`cg_max_steps` must be a non-negative int, got -1'),
    (dict(cg_max_steps=2.5), ValueError, r'`cg_max_steps` must be a non-negative int, got 2.5'),
    (dict(cg_tol=1.5), ValueError, r'`cg_tol` must be None or a float in \[0, 1\), got 1.5'),
    (dict(cg_tol=-1e-3), ValueError, r'`cg_tol`'),
])
def test_bad_solver_args(op, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        op(**good(), **kwargs)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match=r'`chunk_size` must be 16, 32 or 64, got 48'):
        chunk_mesa(**good(), chunk_size=48)


@pytest.mark.parametrize('op', OPS)
def test_bad_cu_seqlens(op):
    kw = good()
    with pytest.raises(ValueError, match=r'batch size is expected to be 1 rather than 2 when using `cu_seqlens`'):
        op(**kw, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    kw = {n: (x[:1] if n not in ('lamb', 'initial_state') else x) for n, x in kw.items()}
    kw['initial_state'] = None
    with pytest.raises(ValueError, match=r'`cu_seqlens` must rise from 0 to T = 5, got \[0, 3, 2, 5\]'):
        op(**kw, cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r'`cu_seqlens` must be a 1-D int32/int64 tensor, got dtype torch.float32'):
        op(**kw, cu_seqlens=torch.tensor([0., 5.]))
    h0 = tuple(h[:1] for h in good()['initial_state'])
    with pytest.raises(ValueError, match=r'\(N = 2 sequences in cu_seqlens\), got \(1, 2, 4, 4\)'):
        op(**{**kw, 'initial_state': h0}, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))


@pytest.mark.parametrize('op', OPS)
def test_mixed_devices(op):
    kw = replace('lamb', lambda kw: kw['lamb'].to('meta'))
    with pytest.raises(ValueError, match=r'all inputs must be on one device'):
        op(**kw)


@pytest.mark.parametrize('op', OPS)
def test_check_values_off(op):
    # the checks of values in device memory (a host sync) are skipped on request; those of shapes stay
    op(**replace('g', lambda kw: kw['g'].abs()), check_values=False)
    op(**replace('lamb', lambda kw: kw['lamb'] - 10), check_values=False)
    with pytest.raises(ValueError, match=r'`lamb` must have shape'):
        op(**replace('lamb', lambda kw: kw['lamb'][:, :3]), check_values=False)


@pytest.mark.parametrize('op', OPS)
def test_cu_seqlens_checked_against_each_call(op):
    # cu_seqlens is read once per tensor object; its check against T is still made on every call
    kw = {n: (x[:1] if n not in ('lamb', 'initial_state') else x) for n, x in good().items()}
    kw['initial_state'] = None
    cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)
    op(**kw, cu_seqlens=cu_seqlens)
    longer = {n: (torch.cat([x, x[:, :1]], 1) if n not in ('lamb', 'initial_state') else x) for n, x in kw.items()}
    with pytest.raises(ValueError, match=r'`cu_seqlens` must rise from 0 to T = 6, got \[0, 2, 5\]'):
        op(**longer, cu_seqlens=cu_seqlens)
