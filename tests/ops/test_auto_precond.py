# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""`precondition='auto'`: Jacobi, then the chunk-start preconditioner for the tokens Jacobi leaves above `cg_tol`.

Both chunk paths (the Triton one under `TRITON_INTERPRET=1` or on a GPU). On hard states the rescue reaches the
float64 answer where Jacobi alone does not; on benign ones (nothing to rescue) it is Jacobi to the bit; the tokens
Jacobi solved keep Jacobi's answer and steps; every gradient against float64; varlen; the chunk map it launches by.
"""

import pytest
import torch
import torch.nn.functional as F

from fla_mesa.ops.mesa import chunk_mesa, naive_exact_mesa
from tests.ops.test_chunk_precond import run, triton_chunk_mesa
from tests.ops.test_hard_states import FAMILIES, hard_inputs, last_outputs
from tests.sm90 import run_apart
from tests.utils import NEEDS_TRITON, on_triton, poison_empty, rel_err, run_with_grads, torch_chunk_path

# `run`'s backends: 'torch' the PyTorch path, any other the Triton one
BACKENDS = ['torch', pytest.param('triton', marks=NEEDS_TRITON)]


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('family,T', [('8 directions', 512), ('1 direction, γ = 1', 256)])
def test_auto_rescues_what_jacobi_leaves(monkeypatch, backend, family, T):
    inputs = [x.float() for x in hard_inputs(T, K=32, V=16, **FAMILIES[family])]
    ref = last_outputs(*hard_inputs(T, K=32, V=16, **FAMILIES[family]))
    floor = rel_err(last_outputs(*inputs), ref)
    o_j, _, steps_j, bad_j = run(monkeypatch, backend, *inputs, precondition=True, return_cg_steps=True,
                                 return_cg_unconverged=True)
    o, _, steps, bad = run(monkeypatch, backend, *inputs, precondition='auto', return_cg_steps=True,
                           return_cg_unconverged=True)
    # the case needs the rescue: Jacobi stops unconverged on some tokens
    assert bad_j.any() and not bad.any(), (bad_j.sum(), bad.sum())
    err = rel_err(o[:, -ref.shape[1]:], ref)
    assert err <= max(1e-3, 2 * floor), (err, floor)
    # tokens Jacobi solved keep its answer and steps; the rescued ones count Jacobi's steps and their own
    assert torch.equal(o[~bad_j], o_j[~bad_j]) and torch.equal(steps[~bad_j], steps_j[~bad_j])
    assert (steps[bad_j] > steps_j[bad_j]).all()


@pytest.mark.parametrize('backend', BACKENDS)
def test_auto_is_jacobi_where_jacobi_converges(monkeypatch, backend):
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 100, 2, 32, 16
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4)
    beta, lamb = torch.rand(B, T, H, generator=gen), 0.25 + F.softplus(torch.randn(H, K, generator=gen))
    o_j, _, steps_j = run(monkeypatch, backend, q, k, v, g, beta, lamb, precondition=True, return_cg_steps=True)
    o, _, steps = run(monkeypatch, backend, q, k, v, g, beta, lamb, precondition='auto', return_cg_steps=True)
    assert torch.equal(o, o_j) and torch.equal(steps, steps_j)


@pytest.mark.parametrize('backend', BACKENDS)
def test_auto_flags_what_the_rescue_leaves(monkeypatch, backend):
    # a budget too small for either solve: every token Jacobi flagged is flagged again, its steps both budgets
    inputs = [x.float() for x in hard_inputs(128, K=32, V=16, dirs=8, noise=1e-2)]
    _, _, steps_j, bad_j = run(monkeypatch, backend, *inputs, precondition=True, cg_max_steps=1, return_cg_steps=True,
                               return_cg_unconverged=True)
    _, _, steps, bad = run(monkeypatch, backend, *inputs, precondition='auto', cg_max_steps=1, return_cg_steps=True,
                           return_cg_unconverged=True)
    assert bad_j.any() and torch.equal(bad, bad_j)
    assert (steps[bad] == 2).all() and torch.equal(steps[~bad], steps_j[~bad])


def grad_errors(monkeypatch, backend, inputs, do, **kwargs):
    ref = run_with_grads(naive_exact_mesa, inputs, do, cu_seqlens=kwargs.get('cu_seqlens'))
    inputs32 = [x.float() if x is not None else None for x in inputs]
    base = run_with_grads(naive_exact_mesa, inputs32, do, cu_seqlens=kwargs.get('cu_seqlens'))
    op = triton_chunk_mesa if backend == 'triton' else chunk_mesa
    with monkeypatch.context() as m:
        if backend == 'torch':
            torch_chunk_path(m)
        out = run_with_grads(op, inputs32, do, precondition='auto', cg_tol=1e-6, **kwargs)
    for name in ['o'] + list(ref[2]):
        pick = (lambda r: r[0]) if name == 'o' else (lambda r, n=name: r[2][n])
        yield name, rel_err(pick(out), pick(ref)), rel_err(pick(base), pick(ref))


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('scale', [1.0, 1e-8])
def test_auto_gradients_hard(monkeypatch, backend, scale):
    # every buffer the kernels leave unwritten would be NaN; the upstream gradient at scale 1 and 1e-8
    poison_empty(monkeypatch)
    inputs = list(hard_inputs(160, K=32, V=8, dirs=8, noise=1e-2)) + [None]
    # the case needs the rescue at this tolerance: Jacobi alone leaves tokens unconverged
    bad = run(monkeypatch, backend, *[x.float() for x in inputs[:6]], cg_tol=1e-6, chunk_size=32, precondition=True,
              return_cg_unconverged=True)[-1]
    assert bad.any()
    do = scale * torch.randn(1, 160, 1, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for name, err, floor in grad_errors(monkeypatch, backend, inputs, do, chunk_size=32):
        assert err <= max(4 * floor, 1e-4), (name, err, floor)


@pytest.mark.parametrize('backend', BACKENDS)
def test_auto_varlen(monkeypatch, backend):
    inputs = list(hard_inputs(150, H=2, K=32, V=8, dirs=4, noise=1e-2)) + [None]
    do = torch.randn(1, 150, 2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 40, 150])
    for name, err, floor in grad_errors(monkeypatch, backend, inputs, do, cu_seqlens=cu_seqlens, chunk_size=32):
        assert err <= max(4 * floor, 1e-4), (name, err, floor)


@NEEDS_TRITON
@pytest.mark.parametrize('cu_seqlens', [None, [0, 40, 150]])
def test_first_pass_marks_the_chunks_to_rescue(cu_seqlens):
    # the Jacobi pass marks a chunk and head (atomically, in the kernel) exactly where one of its rows stops above tol
    from fla_mesa.ops.mesa.chunk import chunk_mesa_fwd
    fwd = on_triton(chunk_mesa_fwd)
    q, k, v, g, beta, lamb = (x.float() for x in hard_inputs(150, H=3, K=32, V=8, dirs=8, noise=1e-2))
    if cu_seqlens is None:
        q, k, v, g, beta = (x.reshape(2, 75, *x.shape[2:]) for x in (q, k, v, g, beta))
    else:
        cu_seqlens = torch.tensor(cu_seqlens)
    *_, need = fwd(q, k, v, g, beta, lamb, None, 30, 1e-5, 'auto', cu_seqlens, 16)
    steps = fwd(q, k, v, g, beta, lamb, None, 30, 1e-5, True, cu_seqlens, 16, flag_unconverged=True)[2].cpu()
    B, T, H = steps.shape
    spans = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [(0, s, e) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    want = torch.stack([(steps[b, c:min(c + 16, e)] < 0).any(0).int() for b, s, e in spans for c in range(s, e, 16)])
    assert want.any() and not want.all()
    assert torch.equal(need.cpu(), want)


# the two passes' kernels compiled for sm_90 on any machine (tests/sm90.py: Triton's own ptxas, no GPU), run
# apart as the interpreter replaces triton.jit: the early returns of the programs with nothing to do must compile
_SM90_SCRIPT = """
from tests.sm90 import compile_sm90
from fla_mesa.ops.mesa import chunk_cg, factor
types = dict(k='*bf16', g='*fp32', beta='*fp32', lamb='*fp32', h_kk='*fp32', factor='*fp32', need='*i32', v='*bf16',
             h_kv='*fp32', x='*fp32', steps='*i32', max_steps='i32', tol2='fp32', T='i32')
consts = dict(H=4, K=32, V=32, BT=64, NR=4, BK=32, BV=32, PREC='bf16x3', PRECONDITION=2, ROUND_P=True, K_IS_BF16=True,
              V_IS_BF16=True, H_IN_LOOP=False, IS_VARLEN=False, FLAG_UNCONVERGED=True, F_IS_BF16=False, RESCUE=True,
              FIRST=False)
kernels = [
    compile_sm90(chunk_cg.chunk_mesa_fwd_kernel_cg, dict(types, b='*bf16', o='*bf16'),
                 dict(consts, O_PREC='bf16x3', READOUT=True, O_IS_BF16=True), num_warps=4, num_stages=1),
    compile_sm90(chunk_cg.chunk_mesa_bwd_kernel_cg, dict(types, do='*bf16'), dict(consts, DO_IS_BF16=True),
                 num_warps=4, num_stages=1),
    # the first passes: the map marked atomically; the adjoint's with the forward's rescued chunks skipped
    compile_sm90(chunk_cg.chunk_mesa_fwd_kernel_cg, dict(types, b='*bf16', o='*bf16'),
                 dict(consts, O_PREC='bf16x3', READOUT=True, O_IS_BF16=True, PRECONDITION=1, RESCUE=False, FIRST=True),
                 num_warps=4, num_stages=1),
    compile_sm90(chunk_cg.chunk_mesa_bwd_kernel_cg, dict(types, do='*bf16'),
                 dict(consts, DO_IS_BF16=True, PRECONDITION=1, RESCUE=False, FIRST=True), num_warps=4, num_stages=1),
    compile_sm90(factor.chunk_start_factor_kernel, dict(h='*fp32', a='*fp32', lamb='*fp32', w='*fp32', need='*i32'),
                 dict(K=32, BS=16, NB=2, PREC='tf32x3', HAS_NEED=True), num_warps=1, num_stages=1),
]
print(' '.join(str(len(k.asm['cubin'])) for k in kernels))
"""


def test_auto_kernels_compile_for_sm90():
    out = run_apart(_SM90_SCRIPT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(int(n) > 0 for n in out.stdout.split()) and len(out.stdout.split()) == 5


def fwd_bwd_functions(backend):
    from fla_mesa.ops.mesa.chunk import chunk_mesa_bwd, chunk_mesa_fwd
    from fla_mesa.ops.mesa.chunk_torch import chunk_mesa_bwd_torch, chunk_mesa_fwd_torch
    if backend == 'torch':
        return chunk_mesa_fwd_torch, chunk_mesa_bwd_torch
    return on_triton(chunk_mesa_fwd), on_triton(chunk_mesa_bwd)


@pytest.mark.parametrize('backend', BACKENDS)
def test_adjoint_skips_jacobi_where_forward_rescued(backend):
    # the backward's adjoint solve starts the chunks the forward had to rescue with the chunk-start preconditioner:
    # the same gradients, fewer steps there, the other chunks as before
    fwd, bwd = fwd_bwd_functions(backend)
    q, k, v, g, beta, lamb = (x.float() for x in hard_inputs(160, H=2, K=32, V=8, dirs=8, noise=1e-2))
    args = (30, 1e-6, 'auto', None, 32)
    _, x, _, _, rescued = fwd(q, k, v, g, beta, lamb, None, *args, flag_unconverged=True)
    # some chunks rescued, not all (the first chunk of each head converges under Jacobi)
    assert rescued is not None and rescued.any() and not rescued.all()
    do = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(v)
    skipped = bwd(x, do, None, k, v, g, beta, lamb, None, *args, flag_unconverged=True, rescued=rescued)
    full = bwd(x, do, None, k, v, g, beta, lamb, None, *args, flag_unconverged=True)
    for a, b in zip(skipped[:6], full[:6]):
        assert rel_err(a, b) <= 1e-3, rel_err(a, b)
    steps_s, steps_f = skipped[-1], full[-1]
    assert (steps_s >= 0).all() and (steps_f >= 0).all()
    # tokens of the rescued chunks: no Jacobi pass (at most cg_max_steps in all, fewer than with it)
    chunk = torch.arange(160) // 32
    if backend == 'torch':
        hit = rescued.permute(0, 2, 1)[:, chunk]          # [B, H, NT] -> [B, T, H]
    else:
        hit = rescued.view(1, -1, 2)[:, chunk].bool()     # [B * NT, H] -> [B, T, H]
    assert (steps_s[hit] <= 30).all() and steps_s[hit].sum() < steps_f[hit].sum()
    assert torch.equal(steps_s[~hit], steps_f[~hit])


@pytest.mark.parametrize('backend', BACKENDS)
def test_skip_jacobi_needs_auto(backend):
    fwd, bwd = fwd_bwd_functions(backend)
    q, k, v, g, beta, lamb = (x.float() for x in hard_inputs(64, K=16, V=8, dirs=4))
    _, x, _, _, _ = fwd(q, k, v, g, beta, lamb, None, 30, 1e-4, True, None, 32)
    rescued = torch.ones(1, 1, 2, dtype=torch.bool) if backend == 'torch' else torch.ones(2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match='skip_jacobi'):
        bwd(x, torch.ones_like(v), None, k, v, g, beta, lamb, None, 30, 1e-4, True, None, 32, rescued=rescued)
