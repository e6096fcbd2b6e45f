# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""`precondition='auto'`: Jacobi, then the chunk preconditioner for the tokens Jacobi leaves above `cg_tol`,
and straight away for the chunks where `precond.jacobi_stall_score` predicts that Jacobi stalls.

Both chunk paths (the Triton one under `TRITON_INTERPRET=1` or on a GPU). On hard states the rescue reaches the
float64 answer where Jacobi alone does not; on benign ones (nothing to rescue, nothing routed) it is Jacobi to the
bit; the tokens Jacobi solved keep Jacobi's answer and steps; every gradient against float64; varlen; the chunk map
it launches by. The hard states here are routed from their first chunk on, so the tests of the rescue pass itself
turn the routing off (`jacobi_first`).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fla_mesa.ops.mesa import chunk_cg, chunk_mesa, chunk_torch, naive_exact_mesa
from fla_mesa.ops.mesa.chunk_torch import ChunkPieces
from fla_mesa.ops.mesa.precond import JACOBI_STALL_FF2, jacobi_stall_score
from tests.ops.test_chunk_precond import run, triton_chunk_mesa
from tests.ops.test_hard_states import FAMILIES, hard_inputs, last_outputs
from tests.sm90 import run_apart
from tests.utils import NEEDS_TRITON, ON_GPU, on_triton, poison_empty, rel_err, run_with_grads, torch_chunk_path

# `run`'s backends: 'torch' the PyTorch path, any other the Triton one
BACKENDS = ['torch', pytest.param('triton', marks=NEEDS_TRITON)]


def jacobi_first(monkeypatch):
    # no chunk routed by the stall predictor on either path: every chunk starts with Jacobi, as before the predictor
    for module in (chunk_torch, chunk_cg):
        monkeypatch.setattr(module, 'JACOBI_STALL_FF2', math.inf)


class FirstPassDone(Exception):
    """Raised by `keep_first_pass(..., stop=True)` once 'auto''s first CG pass has run."""


def keep_first_pass(monkeypatch, stop=False):
    # 'auto''s first CG pass: the call of `chunk_mesa_cg` that its rescue branch makes with the map `_need`. Returns a
    # list that receives, per such call, the map and the steps (flags included) as that pass leaves them: only
    # `chunk_stall_kernel` and the first pass write the map, and the second pass updates the steps in place.
    # `stop`: the run ends there (`FirstPassDone`): the interpreter spends most of a run after it
    kept, real = [], chunk_cg.chunk_mesa_cg

    def first_pass(*args, _need=None, **kwargs):
        out = real(*args, _need=_need, **kwargs)
        if _need is not None:
            kept.append((_need.cpu().clone(), out[1].cpu().clone()))
            if stop:
                raise FirstPassDone
        return out
    monkeypatch.setattr(chunk_cg, 'chunk_mesa_cg', first_pass)
    return kept


@pytest.fixture
def one_cg_config():
    # on a GPU, the CG kernels pinned to one config: the runs compared to the bit (Jacobi alone, 'auto') compile
    # to different kernels, which autotuning may give different row splits that round differently
    restores = []
    if ON_GPU:
        from tests.gpu_configs import gpu_configs, pin
        restores = [pin(tuner, configs[0]) for name, (tuner, configs) in gpu_configs().items() if name.startswith('cg')]
    yield
    for restore in restores:
        restore()


def stall_scores(q, k, v, g, beta, lamb, chunk_size=64):
    """The PyTorch path's `jacobi_stall_score` of every chunk and head, `[B, H, NT]` (no initial state)."""
    return ChunkPieces(k, v, g, beta, lamb, None, chunk_size).stall_score()


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('family,T', [('8 directions', 384), ('1 direction, γ = 1', 256)])
def test_auto_rescues_what_jacobi_leaves(monkeypatch, one_cg_config, backend, family, T):
    # the rescue pass itself: these states are routed (`test_auto_routes_...`)
    jacobi_first(monkeypatch)
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


@pytest.mark.parametrize('K,rank', [(16, None), (64, None), (64, 4)])
def test_jacobi_stall_score(K, rank):
    # ‖F‖_F², F the off-diagonal part of D^-1/2 M D^-1/2 (M = a H + Λ, D = diag(M)), formed directly in float64
    gen = torch.Generator().manual_seed(K)
    w = torch.randn(5, 3, K, rank or K, generator=gen, dtype=torch.float64)
    # random states, and states of `rank` directions with a large trace (the hard families' shape)
    h = w @ w.transpose(-1, -2) * (20 / rank if rank else 1 / K)
    a = torch.rand(5, 3, generator=gen, dtype=torch.float64)
    lamb = 0.25 + torch.rand(3, K, generator=gen, dtype=torch.float64)
    m = a[..., None, None] * h + torch.diag_embed(lamb.expand(5, 3, K))
    d = m.diagonal(dim1=-2, dim2=-1).rsqrt()
    s = d[..., :, None] * m * d[..., None, :]
    want = (s - torch.diag_embed(s.diagonal(dim1=-2, dim2=-1))).square().sum((-2, -1))
    got = jacobi_stall_score(h.float(), a.float(), lamb.float())
    assert got.dtype == torch.float32 and got.shape == (5, 3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(jacobi_stall_score(h, a, lamb), want, rtol=1e-12, atol=0)
    # the low-rank states are routed, the random ones not; no state (a first chunk) scores 0
    assert (want > JACOBI_STALL_FF2).all() if rank else (want < JACOBI_STALL_FF2).all()
    assert (jacobi_stall_score(torch.zeros_like(h), a, lamb) == 0).all()


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('K', [32, 64])
def test_auto_is_jacobi_where_jacobi_converges(monkeypatch, one_cg_config, backend, K):
    gen = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 100, 2, 16
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4)
    beta, lamb = torch.rand(B, T, H, generator=gen), 0.25 + F.softplus(torch.randn(H, K, generator=gen))
    # states that score, but below the threshold: nothing is routed
    scores = stall_scores(q, k, v, g, beta, lamb)
    assert (scores[..., 1:] > 0).all() and (scores < JACOBI_STALL_FF2).all(), scores
    o_j, _, steps_j = run(monkeypatch, backend, q, k, v, g, beta, lamb, precondition=True, return_cg_steps=True)
    o, _, steps = run(monkeypatch, backend, q, k, v, g, beta, lamb, precondition='auto', return_cg_steps=True)
    assert torch.equal(o, o_j) and torch.equal(steps, steps_j)


@pytest.mark.parametrize('backend', BACKENDS)
def test_auto_routes_where_jacobi_stalls(monkeypatch, backend):
    # keys from 8 directions, long memory, K = 64: every chunk scores above the threshold (the first too: its M_c
    # holds its end state) and goes straight to the chunk solve, a few steps a token where Jacobi runs to the cap
    fwd, _ = fwd_bwd_functions(backend)
    inputs = hard_inputs(256, K=64, V=16, **FAMILIES['8 directions'])
    ref = last_outputs(*inputs)
    inputs = [x.float() for x in inputs]
    floor = rel_err(last_outputs(*inputs), ref)
    routed = stall_scores(*inputs)[0, 0] > JACOBI_STALL_FF2
    assert routed.all()
    o, _, steps, _, rescued = fwd(*inputs, None, 30, 1e-4, 'auto', None, 64, flag_unconverged=True)
    assert (steps >= 0).all()
    err = rel_err(o[:, -ref.shape[1]:], ref)
    assert err <= max(1e-3, 2 * floor), (err, floor)
    mean = steps.float().mean().item()
    assert mean <= 5, mean
    if backend == 'torch':
        # the chunks the second pass solved ([B, H, NT]): the routed ones
        assert rescued[0, 0].all()
    else:
        # the kernel's own decision ([B * NT, H]: 2 routed, 1 rescued after Jacobi) is the PyTorch path's
        assert torch.equal(rescued[:, 0] == 2, routed), rescued
    # a routed chunk is solved as 'chunk' solves it: from the Jacobi start, no Jacobi steps (on a GPU the two
    # kernels may autotune to different row splits, so to rounding)
    _, _, steps_c, _, _ = fwd(*inputs, None, 30, 1e-4, 'chunk', None, 64, flag_unconverged=True)
    if ON_GPU and backend != 'torch':
        assert abs(mean - steps_c.float().mean().item()) <= 0.1, (mean, steps_c.float().mean())
    else:
        assert torch.equal(steps, steps_c)


@NEEDS_TRITON
@pytest.mark.parametrize('cu_seqlens', [None, [0, 40, 150]])
def test_first_pass_routes_the_chunks_that_stall(monkeypatch, cu_seqlens):
    # the Triton first pass routes (2) exactly the chunks and heads whose PyTorch score is above the threshold, per
    # sequence when varlen (a sequence's last chunk ends at its final state); states that cross it midway. The marks
    # come from `chunk_stall_kernel`, a pass of its own that reads no CG precision (the first pass returns on a 2
    # before anything the precision changes), so the default precision only: the 'ieee' and 'bf16x3' cases routed
    # the same chunks from the same states
    from fla_mesa.ops.mesa.chunk import chunk_mesa_fwd
    fwd = on_triton(chunk_mesa_fwd)
    q, k, v, g, beta, lamb = (x.float() for x in hard_inputs(150, H=3, K=32, V=8, dirs=8, noise=1e-2, beta=0.5))
    # decays that vary by token, so that the score's a_c (to the chunk's middle token) decides some chunks
    g = F.logsigmoid(3 * torch.randn(g.shape, generator=torch.Generator().manual_seed(4)) + 7)
    if cu_seqlens is None:
        q, k, v, g, beta = (x.reshape(2, 75, *x.shape[2:]) for x in (q, k, v, g, beta))
        seqs = [tuple(x[b:b + 1] for x in (q, k, v, g, beta)) for b in range(2)]
    else:
        seqs = [tuple(x[:, s:e] for x in (q, k, v, g, beta)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        cu_seqlens = torch.tensor(cu_seqlens)
    # the routing is decided before any CG step: a short budget leaves `need == 2` as it is; the map as the first
    # pass leaves it (the factor kernel and the second pass only read it), the run stopped there
    kept = keep_first_pass(monkeypatch, stop=True)
    with pytest.raises(FirstPassDone):
        fwd(q, k, v, g, beta, lamb, None, 2, 1e-5, 'auto', cu_seqlens, 16)
    (need, _), = kept
    want = torch.cat([stall_scores(*x, lamb, chunk_size=16)[0].T > JACOBI_STALL_FF2 for x in seqs])
    assert want.any() and not want.all()
    assert torch.equal(need.cpu() == 2, want)


@pytest.mark.parametrize('backend', BACKENDS)
def test_auto_flags_what_the_rescue_leaves(monkeypatch, backend):
    # a budget too small for either solve: every token Jacobi flagged is flagged again, its steps both budgets
    jacobi_first(monkeypatch)
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
@pytest.mark.parametrize('scale,routing', [(1.0, True), (1.0, False), (1e-8, True)])
def test_auto_gradients_hard(monkeypatch, backend, scale, routing):
    # every buffer the kernels leave unwritten would be NaN; the upstream gradient at scale 1 and 1e-8; with the
    # routing (every chunk scores above the threshold here) and without it (the rescue pass)
    poison_empty(monkeypatch)
    if not routing:
        jacobi_first(monkeypatch)
    inputs = list(hard_inputs(96, K=32, V=8, dirs=8, noise=1e-2)) + [None]
    # the case needs the rescue at this tolerance: Jacobi alone leaves tokens unconverged
    bad = run(monkeypatch, backend, *[x.float() for x in inputs[:6]], cg_tol=1e-6, chunk_size=32, precondition=True,
              return_cg_unconverged=True)[-1]
    assert bad.any()
    do = scale * torch.randn(1, 96, 1, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
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
@pytest.mark.parametrize('cu_seqlens', [None, [0, 40, 110]])
def test_first_pass_marks_the_chunks_to_rescue(monkeypatch, cu_seqlens):
    # the Jacobi pass marks a chunk and head (atomically, in the kernel) exactly where one of its rows stops above tol
    from fla_mesa.ops.mesa.chunk import chunk_mesa_fwd
    jacobi_first(monkeypatch)
    fwd = on_triton(chunk_mesa_fwd)
    q, k, v, g, beta, lamb = (x.float() for x in hard_inputs(110, H=2, K=32, V=8, dirs=8, noise=1e-2))
    if cu_seqlens is None:
        q, k, v, g, beta = (x.reshape(2, 55, *x.shape[2:]) for x in (q, k, v, g, beta))
    else:
        cu_seqlens = torch.tensor(cu_seqlens)
    # the steps (flags included) of the Jacobi pass itself, kept from the first pass (one run, not a second
    # Jacobi-only one: the interpreter is slow)
    kept = keep_first_pass(monkeypatch)
    *_, need = fwd(q, k, v, g, beta, lamb, None, 30, 1e-5, 'auto', cu_seqlens, 16)
    (_, steps), = kept
    B, T, H = steps.shape
    spans = [(b, 0, T) for b in range(B)] if cu_seqlens is None else [(0, s, e) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    want = torch.stack([(steps[b, c:min(c + 16, e)] < 0).any(0).int() for b, s, e in spans for c in range(s, e, 16)])
    assert want.any() and not want.all()
    assert torch.equal(need.cpu(), want)


@NEEDS_TRITON
@pytest.mark.parametrize('N', [1, 700, 2500])
def test_rescue_items_lists_the_map(N):
    # the second pass's work list: every nonzero entry of the map once (1 rescued, 2 routed), after their count;
    # 2500 entries span three programs of the kernel's 1024
    device = 'cuda' if ON_GPU else 'cpu'
    need = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(N), dtype=torch.int32).to(device)
    items = torch.zeros(N + 1, dtype=torch.int32, device=device)
    chunk_cg.rescue_items_kernel[(-(-N // 1024),)](need, items, N, BLOCK=1024)
    want = need.nonzero().flatten().cpu()
    n = int(items[0])
    assert n == len(want)
    assert torch.equal(items[1:1 + n].cpu().sort().values.long(), want)


# the two passes' kernels compiled for sm_90 on any machine (tests/sm90.py: Triton's own ptxas, no GPU), run
# apart as the interpreter replaces triton.jit: the early returns of the programs with nothing to do must compile
_SM90_SCRIPT = """
from tests.sm90 import compile_sm90
from fla_mesa.ops.mesa import chunk_cg, factor
types = dict(k='*bf16', g='*fp32', beta='*fp32', lamb='*fp32', h_kk='*fp32', factor='*fp32', need='*i32',
             items='*i32', v='*bf16', h_kv='*fp32', x='*fp32', steps='*i32', max_steps='i32', tol2='fp32', T='i32')
# the adjoint solve's dq in bfloat16 beside e, and its right-hand side (dx, float32) in the buffer of e
bwd_types = dict(types, b='*fp32', do='*bf16', xl='*bf16')
consts = dict(H=4, K=32, V=32, BT=64, NR=4, BK=32, BV=32, PREC='bf16x3', PRECONDITION=2, ROUND_P=True, K_IS_BF16=True,
              V_IS_BF16=True, H_IN_LOOP=False, IS_VARLEN=False, FLAG_UNCONVERGED=True, F_IS_BF16=False, RESCUE=True,
              FIRST=False)
kernels = [
    compile_sm90(chunk_cg.chunk_mesa_fwd_kernel_cg, dict(types, b='*bf16'), consts, num_warps=4, num_stages=1),
    compile_sm90(chunk_cg.chunk_mesa_bwd_kernel_cg, bwd_types, dict(consts, DO_IS_BF16=True, XL=True),
                 num_warps=4, num_stages=1),
    # the first passes: the map marked (1 unconverged; 2, skipped: a predicted stall or, in the adjoint's,
    # a chunk the forward rescued)
    compile_sm90(chunk_cg.chunk_mesa_fwd_kernel_cg, dict(types, b='*bf16'),
                 dict(consts, PRECONDITION=1, RESCUE=False, FIRST=True), num_warps=4, num_stages=1),
    compile_sm90(chunk_cg.chunk_mesa_bwd_kernel_cg, bwd_types,
                 dict(consts, DO_IS_BF16=True, XL=True, PRECONDITION=1, RESCUE=False, FIRST=True), num_warps=4,
                 num_stages=1),
    # the stall score that marks 2 before the first pass
    # (reading each chunk's start and end states, varlen: the end of a sequence's last chunk from the final states)
    compile_sm90(chunk_cg.chunk_stall_kernel, dict(h_kk='*fp32', ht_kk='*fp32', g='*fp32', lamb='*fp32', need='*i32',
                                                   cu_seqlens='*i64', chunk_indices='*i64', T='i32', NT='i32'),
                 dict(H=4, K=128, BK=128, BR=16, BT=64, STALL_FF2=chunk_cg.JACOBI_STALL_FF2, IS_VARLEN=True), num_warps=4,
                 num_stages=1),
    compile_sm90(factor.chunk_start_factor_kernel, dict(h='*fp32', ht='*fp32', chunk_indices='*i64', lamb='*fp32',
                                                        w='*fp32', need='*i32', items='*i32', NL='i32', NT='i32',
                                                        scale='fp32'),
                 dict(H=4, K=32, BS=16, NB=2, PREC='tf32x3', HAS_NEED=True, HAS_ITEMS=True, HAS_END=True, HAS_A=False,
                      IS_VARLEN=True),
                 num_warps=1, num_stages=1),
    # the second pass's work list
    compile_sm90(chunk_cg.rescue_items_kernel, dict(need='*i32', items='*i32', N='i32'), dict(BLOCK=1024),
                 num_warps=4, num_stages=1),
]
print(' '.join(str(len(k.asm['cubin'])) for k in kernels))
"""


def test_auto_kernels_compile_for_sm90():
    out = run_apart(_SM90_SCRIPT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(int(n) > 0 for n in out.stdout.split()) and len(out.stdout.split()) == 7


def fwd_bwd_functions(backend):
    from fla_mesa.ops.mesa.chunk import chunk_mesa_bwd, chunk_mesa_fwd
    from fla_mesa.ops.mesa.chunk_torch import chunk_mesa_bwd_torch, chunk_mesa_fwd_torch
    if backend == 'torch':
        return chunk_mesa_fwd_torch, chunk_mesa_bwd_torch
    return on_triton(chunk_mesa_fwd), on_triton(chunk_mesa_bwd)


@pytest.mark.parametrize('backend', BACKENDS)
def test_adjoint_skips_jacobi_where_forward_rescued(monkeypatch, one_cg_config, backend):
    # the backward's adjoint solve starts the chunks the forward had to rescue with the chunk preconditioner:
    # the same gradients, fewer steps there, the other chunks as before (routing off: else both backwards route
    # these chunks alike). Every buffer left unwritten would be NaN
    poison_empty(monkeypatch)
    jacobi_first(monkeypatch)
    fwd, bwd = fwd_bwd_functions(backend)
    q, k, v, g, beta, lamb = (x.float() for x in hard_inputs(64, H=2, K=32, V=8, dirs=8, noise=1e-2))
    args = (30, 1e-6, 'auto', None, 32)
    # Triton: the second pass's programs walk the list in strides: one program (every item in turn) here, more
    # programs than items (one each) for the forward's solve again and the last backward below, every output the
    # same to the bit. The forward's solve (its call of chunk_mesa_cg) kept for that
    solves = []
    if backend == 'triton':
        from fla_mesa.ops.mesa import chunk
        monkeypatch.setattr(chunk_cg, '_rescue_programs', lambda index: 1)

        def kept_solve(*a, **kw):
            solves.append((a, kw, chunk_cg.chunk_mesa_cg(*a, **kw)))
            return solves[-1][2]
        monkeypatch.setattr(chunk, 'chunk_mesa_cg', kept_solve)
    _, x, steps, _, rescued = fwd(q, k, v, g, beta, lamb, None, *args, flag_unconverged=True)
    assert rescued is not None
    assert (rescued[1:] if backend == 'triton' else rescued[..., 1:]).any()
    if backend == 'triton':
        # every token converged, some of them in the second pass (past Jacobi's 30 steps)
        assert (steps > 0).all() and (steps > 30).any() and not (steps > 30).all()
        # the solve again with more programs than items and the factor given (no factor kernel runs, so
        # `rescue_items_kernel` lists the map): the same x, steps, o and map to the bit as one program with the
        # factor built for the chunks that need it
        from fla_mesa.ops.mesa.factor import chunk_start_factor_triton
        (a, kw, want), = solves
        w = chunk_start_factor_triton(a[5], 0.5, a[4], torch.float32, ht_kk=kw['ht_kk'])
        monkeypatch.setattr(chunk_cg, '_rescue_programs', lambda index: 64)
        got = chunk_cg.chunk_mesa_cg(*a, **kw, factor=w)
        monkeypatch.setattr(chunk_cg, '_rescue_programs', lambda index: 1)
        assert len(got) == 4 and all(torch.equal(x_w, x_b) for x_w, x_b in zip(got, want))
    # the first chunk unmarked, so that some chunks keep the Jacobi pass (whether Jacobi converges there to 1e-6
    # depends on the device's rounding: on an H200 it did not)
    rescued = rescued.clone()
    if backend == 'torch':
        rescued[..., 0] = False                           # [B, H, NT]
    else:
        rescued[0] = 0                                    # [B * NT, H], B = 1
    do = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(v)
    skipped = bwd(x, do, None, k, v, g, beta, lamb, None, *args, flag_unconverged=True, rescued=rescued)
    full = bwd(x, do, None, k, v, g, beta, lamb, None, *args, flag_unconverged=True)
    for a, b in zip(skipped[:6], full[:6]):
        assert rel_err(a, b) <= 1e-3, rel_err(a, b)
    steps_s, steps_f = skipped[-1], full[-1]
    assert (steps_s >= 0).all() and (steps_f >= 0).all()
    # tokens of the rescued chunks: no Jacobi pass (at most cg_max_steps in all, fewer than with it)
    chunk = torch.arange(64) // 32
    if backend == 'torch':
        hit = rescued.permute(0, 2, 1)[:, chunk]          # [B, H, NT] -> [B, T, H]
    else:
        hit = rescued.view(1, -1, 2)[:, chunk].bool()     # [B * NT, H] -> [B, T, H]
    assert (steps_s[hit] <= 30).all() and steps_s[hit].sum() < steps_f[hit].sum()
    assert torch.equal(steps_s[~hit], steps_f[~hit])
    if backend == 'triton':
        # for bfloat16 q the adjoint CG kernel writes dq = e rounded to bfloat16 beside e (no cast pass): e's own
        # rounding to the bit, in both passes of 'auto' (the first chunk's rows take the first (Jacobi) pass, the
        # others the second), every other output as with a float32 dq. The backward routes nothing itself: given
        # the forward's map it sends every chunk in it to the second pass, so routing in the forward would only
        # change which chunks the map holds. This run with more programs than items (one each), the others with one
        monkeypatch.setattr(chunk_cg, '_rescue_programs', lambda index: 64)
        low = bwd(x, do, None, k, v, g, beta, lamb, None, *args, flag_unconverged=True, rescued=rescued,
                  dq_dtype=torch.bfloat16)
        assert low[0].dtype == torch.bfloat16 and skipped[0].dtype == torch.float32
        assert torch.equal(low[0], skipped[0].to(torch.bfloat16))
        for a, b in zip(low[1:6] + low[7:], skipped[1:6] + skipped[7:]):
            assert torch.equal(a, b)


@NEEDS_TRITON
def test_adjoint_dq_buffer_checked():
    q, k, v, g, beta, lamb = (x.float() for x in hard_inputs(32, K=16, V=8, dirs=4))
    h_kk = torch.zeros(1, 1, 1, 16, 16)
    h_kv = torch.zeros(1, 1, 1, 16, 8)
    for xl in (torch.empty(1, 32, 1, 16), torch.empty(1, 32, 1, 8, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match='`xl`'):
            chunk_cg.chunk_mesa_cg(None, k, g, beta, lamb, h_kk, 30, 1e-4, True, v=v, h_kv=h_kv, do=v, xl=xl,
                                   chunk_size=32)


@pytest.mark.parametrize('backend', BACKENDS)
def test_skip_jacobi_needs_auto(backend):
    fwd, bwd = fwd_bwd_functions(backend)
    q, k, v, g, beta, lamb = (x.float() for x in hard_inputs(64, K=16, V=8, dirs=4))
    _, x, _, _, _ = fwd(q, k, v, g, beta, lamb, None, 30, 1e-4, True, None, 32)
    rescued = torch.ones(1, 1, 2, dtype=torch.bool) if backend == 'torch' else torch.ones(2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match='skip_jacobi'):
        bwd(x, torch.ones_like(v), None, k, v, g, beta, lamb, None, 30, 1e-4, True, None, 32, rescued=rescued)
