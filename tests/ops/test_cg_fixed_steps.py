# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Every CG path stopped after a few steps, long before convergence, against textbook (preconditioned) CG written here
in float64 on the materialised `A_t = H_t + Λ` (not the project's `cg_solve`, so a slip written into both fails).
A converged solve hides a wrong preconditioner or start (CG still converges, only slower); the iterates after 1-3
steps show it. The project's CG (op README, "The solver"): Jacobi start `x0 = b / diag(A)`, then plain or
Jacobi-preconditioned CG steps.
"""

import os

import pytest
import torch

from fla_mesa.ops.mesa import chunk_mesa
from fla_mesa.ops.mesa.fused_recurrent import fused_recurrent_mesa
from tests.utils import ON_GPU, fp32_bound, make_inputs, on_cuda, rel_err, torch_chunk_path

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
BACKENDS = ['torch']
if INTERPRET or ON_GPU:
    BACKENDS.append('triton')


def textbook_cg(q, k, v, g, beta, lamb, initial_state, steps, precondition):
    """o_t = S_tᵀ x_t with x_t after `steps` CG iterations from the Jacobi start, per token, in float64."""
    B, T, H, K = q.shape
    h_kk, h_kv = initial_state
    out = []
    for t in range(T):
        gamma = g[:, t].exp()[..., None, None]
        kb = k[:, t] * beta[:, t, :, None]
        h_kk = gamma * h_kk + kb[..., :, None] * k[:, t, :, None, :]
        h_kv = gamma * h_kv + kb[..., :, None] * v[:, t, :, None, :]
        A = h_kk + torch.diag_embed(lamb.expand_as(q[:, t]))
        d = torch.diagonal(A, dim1=-2, dim2=-1)
        b = q[:, t]
        x = b / d
        r = b - (A @ x[..., None])[..., 0]
        z = r / d if precondition else r
        p, rz = z, (r * z).sum(-1, keepdim=True)
        for _ in range(steps):
            Ap = (A @ p[..., None])[..., 0]
            alpha = rz / (p * Ap).sum(-1, keepdim=True)
            x, r = x + alpha * p, r - alpha * Ap
            z = r / d if precondition else r
            rz_new = (r * z).sum(-1, keepdim=True)
            p, rz = z + rz_new / rz * p, rz_new
        out.append(torch.einsum('bhk,bhkv->bhv', x, h_kv))
    return torch.stack(out, 1)


def case(steps, precondition):
    # keys anisotropic and Λ spread, so that diag(A) is far from a multiple of the identity and the preconditioner
    # changes the iterates
    inputs = make_inputs(1, 20, 2, 16, 8, initial_state=True, gate=(4.0, 1.0), seed=11)
    scale = torch.linspace(0.3, 3.0, 16, dtype=torch.float64)
    inputs[1] = inputs[1] * scale
    inputs[5] = inputs[5] * scale.flip(0)
    ref = textbook_cg(*inputs, steps, precondition)
    return inputs, ref


def f32(inputs):
    return [x.float() for x in inputs[:6]] + [tuple(h.float() for h in inputs[6])]


@pytest.mark.parametrize('precondition', [False, True])
@pytest.mark.parametrize('steps', [1, 3])
def test_chunk_fixed_steps(monkeypatch, steps, precondition):
    inputs, ref = case(steps, precondition)
    # float64 runs the PyTorch path: the same iterates to rounding
    o64, _ = chunk_mesa(*inputs, cg_max_steps=steps, cg_tol=None, precondition=precondition, chunk_size=16)
    assert rel_err(o64, ref) <= 1e-12, f"float64: {rel_err(o64, ref):.2e}"
    # FlashAttention's rule against the textbook CG run in float32
    bound = fp32_bound(rel_err(textbook_cg(*f32(inputs), steps, precondition), ref), ON_GPU)
    for backend in BACKENDS:
        with monkeypatch.context() as m:
            if backend == 'torch':
                torch_chunk_path(m)
            else:
                # the plain directions: the rounded ones (the default) change the iterates by design
                from fla_mesa.ops.mesa import chunk_cg
                m.setattr(chunk_cg, 'CG_ROUND_DIRECTIONS', False)
            fn = on_cuda(chunk_mesa) if backend == 'triton' and ON_GPU else chunk_mesa
            o, _ = fn(*f32(inputs), cg_max_steps=steps, cg_tol=None, precondition=precondition, chunk_size=16)
        assert rel_err(o, ref) <= bound, f"{backend}: {rel_err(o, ref):.2e} > {bound:.2e}"


@pytest.mark.skipif(not (INTERPRET or ON_GPU), reason='the recurrent kernel: needs TRITON_INTERPRET=1 or a GPU')
@pytest.mark.parametrize('precondition', [False, True])
@pytest.mark.parametrize('steps', [1, 3])
def test_recurrent_fixed_steps(steps, precondition):
    inputs, ref = case(steps, precondition)
    fn = on_cuda(fused_recurrent_mesa) if ON_GPU else fused_recurrent_mesa
    o64, _ = fn(*inputs, cg_max_steps=steps, cg_tol=None, precondition=precondition)
    o32, _ = fn(*f32(inputs), cg_max_steps=steps, cg_tol=None, precondition=precondition)
    assert rel_err(o64, ref) <= 1e-12, f"float64: {rel_err(o64, ref):.2e}"
    bound = fp32_bound(rel_err(textbook_cg(*f32(inputs), steps, precondition), ref), ON_GPU)
    assert rel_err(o32, ref) <= bound, f"float32: {rel_err(o32, ref):.2e} > {bound:.2e}"
