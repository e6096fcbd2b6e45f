# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The chunk preconditioner (`precondition='chunk'`) in the Triton chunk kernels, against float64.

Under `TRITON_INTERPRET=1` (CI) or on a GPU (inputs moved there, results back: `on_cuda`). The forward solve and the
backward's adjoint solve both use it; the bounds are `test_hard_states.py`'s: the issue's 1e-3 or twice the float32
floor for the output, and for every gradient twice the larger of the float32 reference's error and the PyTorch
path's with the same preconditioner.
"""

import pytest
import torch

from fla_mesa.ops.mesa import chunk_cg, chunk_mesa, naive_exact_mesa
from tests.ops.test_hard_states import FAMILIES, hard_inputs, last_outputs
from tests.utils import NEEDS_TRITON, on_triton, poison_empty, rel_err, run_with_grads, torch_chunk_path

triton_chunk_mesa = on_triton(chunk_mesa)
pytestmark = NEEDS_TRITON


def run(monkeypatch, backend, *args, **kwargs):
    if backend != 'torch':
        return triton_chunk_mesa(*args, **kwargs)
    with monkeypatch.context() as m:
        torch_chunk_path(m)
        return chunk_mesa(*args, **kwargs)


@pytest.mark.parametrize('family', ['8 directions', '1 direction, γ = 1'])
def test_triton_chunk_forward_hard(monkeypatch, family):
    inputs = [x.float() for x in hard_inputs(256, K=32, V=16, **FAMILIES[family])]
    ref = last_outputs(*hard_inputs(256, K=32, V=16, **FAMILIES[family]))
    floor = rel_err(last_outputs(*inputs), ref)
    o, _, steps = run(monkeypatch, 'auto', *inputs, precondition='chunk', return_cg_steps=True)
    err = rel_err(o[:, -ref.shape[1]:], ref)
    assert err <= max(1e-3, 2 * floor), (err, floor)
    # the PyTorch path's steps with the same M_c: the kernel's rounded directions cost some conjugacy (op README),
    # without them the two agree to rounding
    _, _, steps_torch = run(monkeypatch, 'torch', *inputs, precondition='chunk', return_cg_steps=True)
    mean, mean_torch = steps.float().mean().item(), steps_torch.float().mean().item()
    assert mean <= 6 and mean <= mean_torch + 1.25, (mean, mean_torch)
    monkeypatch.setattr(chunk_cg, 'CG_ROUND_DIRECTIONS', False)
    _, _, steps_plain = run(monkeypatch, 'auto', *inputs, precondition='chunk', return_cg_steps=True)
    assert abs(steps_plain.float().mean().item() - mean_torch) <= 0.1, (steps_plain.float().mean(), mean_torch)


@pytest.mark.parametrize('cu_seqlens', [None, [0, 100, 256]])
def test_factor_kernel_keeps_the_steps(monkeypatch, cu_seqlens):
    # the Triton path factorises M_c with factor.py's float32 kernel (here 4 x 4 blocks of 16), the PyTorch path in
    # float64: without rounded directions both take the same steps (rounding in W may change step counts only);
    # varlen: a sequence's last chunk (ending inside a chunk) ends at its own final state on both paths
    monkeypatch.setattr(chunk_cg, 'CG_ROUND_DIRECTIONS', False)
    inputs = [x.float() for x in hard_inputs(256, K=64, V=16, **FAMILIES['8 directions + noise'])]
    kw = dict(precondition='chunk', return_cg_steps=True)
    if cu_seqlens is not None:
        kw['cu_seqlens'] = torch.tensor(cu_seqlens)
    _, _, steps = run(monkeypatch, 'auto', *inputs, **kw)
    _, _, steps_torch = run(monkeypatch, 'torch', *inputs, **kw)
    mean, mean_torch = steps.float().mean().item(), steps_torch.float().mean().item()
    assert mean_torch < 8 and abs(mean - mean_torch) <= 0.1, (mean, mean_torch)


def grad_errors(monkeypatch, inputs, do, **kwargs):
    ref = run_with_grads(naive_exact_mesa, inputs, do, cu_seqlens=kwargs.get('cu_seqlens'))
    inputs32 = [x.float() if x is not None else None for x in inputs]
    base = run_with_grads(naive_exact_mesa, inputs32, do, cu_seqlens=kwargs.get('cu_seqlens'))
    with monkeypatch.context() as m:
        torch_chunk_path(m)
        torch_path = run_with_grads(chunk_mesa, inputs32, do, precondition='chunk', cg_tol=None, **kwargs)
    out = run_with_grads(triton_chunk_mesa, inputs32, do, precondition='chunk', cg_tol=None, **kwargs)
    for name in ['o'] + list(ref[2]):
        pick = (lambda r: r[0]) if name == 'o' else (lambda r, n=name: r[2][n])
        yield name, *(rel_err(pick(r), pick(ref)) for r in (out, base, torch_path))


@pytest.mark.parametrize('scale', [1.0, 1e-8])
@pytest.mark.parametrize('family', ['8 directions + noise', '1 direction, γ = 1'])
def test_triton_chunk_gradients_hard(monkeypatch, family, scale):
    # every buffer the kernels leave unwritten would be NaN; the upstream gradient at scale 1 and 1e-8
    poison_empty(monkeypatch)
    inputs = list(hard_inputs(160, K=16, V=8, **FAMILIES[family])) + [None]
    do = scale * torch.randn(1, 160, 1, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, err, floor, err_torch in grad_errors(monkeypatch, inputs, do, chunk_size=32):
        assert err <= 2 * max(floor, err_torch, 1e-6), (name, err, floor, err_torch)


def test_triton_chunk_varlen(monkeypatch):
    # two sequences, the first ending inside a chunk: each chunk's M_c from its own sequence's state and middle token
    inputs = list(hard_inputs(150, H=2, K=16, V=8, dirs=4, noise=1e-2)) + [None]
    do = torch.randn(1, 150, 2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 40, 150])
    for name, err, floor, err_torch in grad_errors(monkeypatch, inputs, do, cu_seqlens=cu_seqlens, chunk_size=32):
        assert err <= 2 * max(floor, err_torch, 1e-6), (name, err, floor, err_torch)
