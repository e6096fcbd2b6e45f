# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""`cg_max_steps=0` (no solve, q* = q: gated linear attention), forward and every gradient against float64.

The reference is `naive_gla` (tests/utils.py) differentiated by autograd in float64; bounds as in test_chunk.py:
FlashAttention's rule against the same reference run in float32, and for bf16 inputs the bf16 rounding floor of
the float64 result of the same rounded inputs.
"""

import os

import pytest
import torch

from fla_mesa.ops.mesa import chunk_mesa
from fla_mesa.ops.mesa.fused_recurrent import fused_recurrent_mesa
from tests.utils import (
    BF16X3_BOUND, ON_GPU, bf16_floor, fp32_bound, make_inputs, naive_gla, on_cuda, rel_err, run_with_grads, torch_chunk_path,
)

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
BACKENDS = ['torch']
if INTERPRET:
    BACKENDS.append('triton')
elif ON_GPU:
    BACKENDS.append('cuda')
NAMES = ['o', 'h_kk', 'h_kv', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb', 'dh0_kk', 'dh0_kv']


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == 'torch':
        torch_chunk_path(monkeypatch)
    return request.param


def op(backend):
    return on_cuda(chunk_mesa) if backend == 'cuda' else chunk_mesa


def flat(result):
    o, (h_kk, h_kv), grads = result
    return dict(o=o, h_kk=h_kk, h_kv=h_kv, **grads)


def upstream(B, T, H, K, V, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, V, generator=gen, dtype=torch.float64),
            (torch.randn(B, H, K, K, generator=gen, dtype=torch.float64),
             torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)))


def cast(inputs, dtype):
    return [x.to(dtype) for x in inputs[:6]] + [tuple(h.to(dtype) for h in inputs[6])]


@pytest.mark.parametrize('T,C', [(40, 16), (70, 64)])
def test_no_solve_fp32_matches_float64(backend, T, C):
    inputs = make_inputs(2, T, 2, 16, 8, initial_state=True, gate=(4.0, 1.0))
    do, dht = upstream(2, T, 2, 16, 8)
    ref = flat(run_with_grads(naive_gla, inputs, do, dht))
    base = flat(run_with_grads(naive_gla, cast(inputs, torch.float32), do, dht))
    out = flat(run_with_grads(op(backend), cast(inputs, torch.float32), do, dht, cg_max_steps=0, chunk_size=C))
    assert (out['dlamb'] == 0).all()
    for name in NAMES:
        if name == 'dlamb':
            continue
        err, b = rel_err(out[name], ref[name]), rel_err(base[name], ref[name])
        assert err <= fp32_bound(b, backend == 'cuda'), f"{name}: {err:.2e} vs fp32 reference {b:.2e}"


def test_no_solve_bf16_matches_float64(backend):
    # bf16 q, k, v: on the Triton path fla's chunk_fwd_o and the dx kernel; every bf16 result (cast from float32 by
    # torch: rounded to nearest) within 1.5x its own bf16 rounding floor
    inputs = make_inputs(1, 40, 2, 16, 16, initial_state=True, gate=(4.0, 1.0), seed=5)
    inputs[:3] = [x.bfloat16().double() for x in inputs[:3]]
    do, dht = upstream(1, 40, 2, 16, 16)
    do = do.bfloat16().double()
    ref = flat(run_with_grads(naive_gla, inputs, do, dht))
    base = flat(run_with_grads(naive_gla, cast(inputs, torch.float32), do, dht))
    inputs16 = [x.bfloat16() for x in inputs[:3]] + cast(inputs, torch.float32)[3:]
    out = flat(run_with_grads(op(backend), inputs16, do, dht, cg_max_steps=0, chunk_size=16))
    for name in NAMES:
        if name == 'dlamb':
            assert (out[name] == 0).all()
            continue
        err = rel_err(out[name], ref[name])
        if out[name].dtype == torch.bfloat16:
            bound = 1.5 * bf16_floor(ref[name])
        else:
            # float32 results: the PyTorch path computes them in float32, the kernels with bf16x3 products
            bound = fp32_bound(rel_err(base[name], ref[name])) if backend == 'torch' else BF16X3_BOUND
        assert err <= bound, f"{name}: {err:.2e} > {bound:.2e}"


@pytest.mark.skipif(not (INTERPRET or ON_GPU), reason='the recurrent kernel: needs TRITON_INTERPRET=1 or a GPU')
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_no_solve_recurrent_matches_float64(dtype):
    inputs = make_inputs(2, 5, 2, 16, 8, initial_state=True)
    ref_o, (ref_kk, ref_kv) = naive_gla(*inputs)
    base_o, (base_kk, base_kv) = naive_gla(*cast(inputs, torch.float32))
    fn = on_cuda(fused_recurrent_mesa) if ON_GPU else fused_recurrent_mesa
    o, (h_kk, h_kv), steps = fn(*cast(inputs, dtype), output_final_state=True, cg_max_steps=0, return_cg_steps=True)
    assert (steps == 0).all()
    for name, x, r, b in (('o', o, ref_o, base_o), ('h_kk', h_kk, ref_kk, base_kk), ('h_kv', h_kv, ref_kv, base_kv)):
        bound = 1e-13 if dtype == torch.float64 else fp32_bound(rel_err(b, r), ON_GPU)
        assert rel_err(x, r) <= bound, f"{name}: {rel_err(x, r):.2e} > {bound:.1e}"
