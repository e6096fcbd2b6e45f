# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""`fused_recurrent_mesa` (the Triton kernel, under TRITON_INTERPRET=1 or on a GPU) against the float64 exact solve and the other paths.

Tolerances:
- float64 inputs run the kernel in float64: with `cg_tol=None` and more steps than the head dim, CG has converged
  to rounding, so outputs and states must match the exact solve to 1e-10 (observed ~1e-15), and token-by-token
  runs must match the PyTorch CG (`naive_recurrent_mesa`) step for step.
- float32 inputs (float32 states and solve): FlashAttention's rule (`fp32_bound`): at most 2x the error of the exact
  solve run in float32 (floor 3e-7; with GPU's factor on a GPU).
- against `chunk_mesa` in float32 with `cg_tol=1e-4`: a token may stop one step apart on the two paths, which the
  tolerance allows to move x by up to κ(A)·1e-4; bounded here by 2e-3 as in test_chunk.py.
- bf16 inputs: 1.5x the error of rounding the float64 output itself to bf16 (the output rounding is the floor).
"""

import os

import pytest
import torch

from fla_mesa.ops.mesa import chunk_mesa, naive_exact_mesa, naive_recurrent_mesa
from fla_mesa.ops.mesa.fused_recurrent import fused_recurrent_mesa
from tests.sm90 import run_apart
from tests.utils import ON_GPU, bf16_floor, fp32_bound, make_inputs, on_cuda, rel_err

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
pytestmark = pytest.mark.skipif(not (INTERPRET or ON_GPU), reason='needs TRITON_INTERPRET=1 or a GPU')
_fused_recurrent_mesa = fused_recurrent_mesa


@pytest.fixture(autouse=True)
def kernel_on_gpu(monkeypatch):
    # on a GPU the same tests run the kernel there: inputs moved to it, results back (`on_cuda`)
    if ON_GPU:
        monkeypatch.setitem(globals(), 'fused_recurrent_mesa', on_cuda(_fused_recurrent_mesa))


def to(inputs, dtype):
    out = [x.to(dtype) for x in inputs[:6]]
    h0 = inputs[6]
    return out + [None if h0 is None else tuple(h.to(torch.float64 if dtype == torch.float64 else torch.float32) for h in h0)]


def exact(inputs, **kwargs):
    return naive_exact_mesa(*to(inputs, torch.float64), output_final_state=True, **kwargs)


CASES = [
    # B, T, H, K, V, initial state
    (2, 5, 2, 16, 8, True),
    (1, 4, 1, 20, 12, False),   # K, V not powers of two
    (1, 3, 1, 72, 8, True),     # float64 K = 72 pads to 128 > 64: H streamed through the state buffer
]


@pytest.mark.parametrize('B,T,H,K,V,h0', [pytest.param(*c, id='B{}-T{}-H{}-K{}-V{}-h0{}'.format(*c)) for c in CASES])
def test_float64_matches_exact(B, T, H, K, V, h0):
    inputs = make_inputs(B, T, H, K, V, dtype=torch.float64, initial_state=h0)
    o, (h_kk, h_kv), steps = fused_recurrent_mesa(*inputs, output_final_state=True, cg_max_steps=K + 8, cg_tol=None,
                                                  return_cg_steps=True)
    ref, (r_kk, r_kv) = exact(inputs)
    assert o.dtype == h_kk.dtype == h_kv.dtype == torch.float64 and steps.dtype == torch.int32
    for name, x, y in (('o', o, ref), ('h_kk', h_kk, r_kk), ('h_kv', h_kv, r_kv)):
        assert rel_err(x, y) <= 1e-10, f"{name}: {rel_err(x, y):.2e}"


@pytest.mark.parametrize('B,T,H,K,V,h0', [(1, 6, 2, 16, 24, True), (2, 3, 1, 130, 8, False)],
                         ids=['K16-V24', 'K130-streamed'])
def test_float32_matches_exact(B, T, H, K, V, h0):
    inputs = make_inputs(B, T, H, K, V, dtype=torch.float64, initial_state=h0)
    o, (h_kk, h_kv) = fused_recurrent_mesa(*to(inputs, torch.float32), output_final_state=True, cg_max_steps=40,
                                           cg_tol=None)
    ref, (r_kk, r_kv) = exact(inputs)
    base = naive_exact_mesa(*to(inputs, torch.float32), output_final_state=True)
    assert o.dtype == h_kk.dtype == h_kv.dtype == torch.float32
    for name, x, y, b in (('o', o, ref, base[0]), ('h_kk', h_kk, r_kk, base[1][0]), ('h_kv', h_kv, r_kv, base[1][1])):
        bound = fp32_bound(rel_err(b, y), ON_GPU)
        assert rel_err(x, y) <= bound, f"{name}: {rel_err(x, y):.2e} > {bound:.2e}"


def test_bf16_matches_exact():
    inputs = make_inputs(2, 6, 2, 16, 16, dtype=torch.float64, initial_state=True)
    inputs16 = [x.bfloat16() for x in inputs[:5]] + [inputs[5].float(), inputs[6]]
    o, _ = fused_recurrent_mesa(*inputs16, cg_max_steps=40, cg_tol=None)
    # the reference starts from the same bf16-rounded inputs
    ref, _ = exact(inputs16)
    assert o.dtype == torch.bfloat16
    # the floor: rounding the float64 output to bf16; the kernel stores o in bf16, which Triton's interpreter does
    # by truncation (the GPU rounds to nearest)
    floor = bf16_floor(ref, truncated=INTERPRET)
    assert rel_err(o, ref) <= 1.5 * floor, f"{rel_err(o, ref):.2e} vs bf16 rounding {floor:.2e}"


@pytest.mark.parametrize('cg_tol', [None, 1e-4])
def test_float32_matches_chunk(cg_tol):
    inputs = to(make_inputs(2, 20, 2, 16, 8, dtype=torch.float64, initial_state=True), torch.float32)
    o, (h_kk, h_kv), steps = fused_recurrent_mesa(*inputs, output_final_state=True, cg_max_steps=30, cg_tol=cg_tol,
                                                  return_cg_steps=True)
    o_c, (c_kk, c_kv), steps_c = chunk_mesa(*inputs, output_final_state=True, cg_max_steps=30, cg_tol=cg_tol,
                                            return_cg_steps=True, chunk_size=16)
    assert rel_err(o, o_c) <= (1e-5 if cg_tol is None else 2e-3)
    assert rel_err(h_kk, c_kk) <= 1e-6 and rel_err(h_kv, c_kv) <= 1e-6
    if cg_tol is not None:
        # float32 rounding differs between the paths: a token on the edge of the tolerance may stop a step apart
        assert (steps - steps_c).abs().max() <= 1 and (steps == steps_c).float().mean() >= 0.9


@pytest.mark.parametrize('precondition', [False, True])
@pytest.mark.parametrize('cg_tol', [None, 1e-4, 1e-2])
@pytest.mark.parametrize('cg_max_steps', [0, 3, 30])
def test_matches_naive_recurrent_step_for_step(cg_max_steps, cg_tol, precondition):
    inputs = make_inputs(2, 4, 2, 12, 8, dtype=torch.float64, initial_state=True)
    kwargs = dict(output_final_state=True, cg_max_steps=cg_max_steps, cg_tol=cg_tol, precondition=precondition,
                  return_cg_steps=True)
    o, (h_kk, h_kv), steps = fused_recurrent_mesa(*inputs, **kwargs)
    o_n, (n_kk, n_kv), steps_n = naive_recurrent_mesa(*inputs, **kwargs)
    if cg_tol is None and cg_max_steps == 30:
        # run to the residual floor (`residual_floor2`), reached at a step that the last bits of the sums decide
        assert (steps - steps_n).abs().max() <= 1 and (steps == steps_n).float().mean() >= 0.75, \
            f"{steps.flatten().tolist()} != {steps_n.flatten().tolist()}"
    else:
        assert torch.equal(steps, steps_n), f"{steps.flatten().tolist()} != {steps_n.flatten().tolist()}"
    assert rel_err(o, o_n) <= 1e-12 and rel_err(h_kk, n_kk) <= 1e-14 and rel_err(h_kv, n_kv) <= 1e-14
    if cg_max_steps == 0:
        assert (steps == 0).all()


def test_float32_step_counts_match_naive_recurrent():
    inputs = to(make_inputs(1, 12, 2, 16, 8, dtype=torch.float64, gate=(6.0, 1.0), initial_state=True), torch.float32)
    o, _, steps = fused_recurrent_mesa(*inputs, cg_max_steps=30, cg_tol=1e-4, return_cg_steps=True)
    o_n, _, steps_n = naive_recurrent_mesa(*inputs, cg_max_steps=30, cg_tol=1e-4, return_cg_steps=True)
    # float32 sums run in another order: allow a token on the edge of the tolerance to stop one step apart
    assert (steps - steps_n).abs().max() <= 1 and (steps == steps_n).float().mean() >= 0.9
    assert rel_err(o, o_n) <= 2e-3


def test_all_at_once_equals_one_by_one():
    inputs = make_inputs(2, 5, 2, 16, 12, dtype=torch.float64, initial_state=True)
    q, k, v, g, beta, lamb, state = inputs
    kwargs = dict(output_final_state=True, cg_max_steps=30, cg_tol=1e-6, return_cg_steps=True)
    o, final, steps = fused_recurrent_mesa(*inputs, **kwargs)
    outs, all_steps = [], []
    for t in range(q.shape[1]):
        o_t, state, s_t = fused_recurrent_mesa(*(x[:, t:t + 1] for x in (q, k, v, g, beta)), lamb, state, **kwargs)
        outs.append(o_t)
        all_steps.append(s_t)
    assert torch.equal(torch.cat(all_steps, 1), steps)
    assert rel_err(torch.cat(outs, 1), o) <= 1e-13
    assert rel_err(state[0], final[0]) <= 1e-14 and rel_err(state[1], final[1]) <= 1e-14


def test_continues_a_chunk_prefill():
    inputs = make_inputs(1, 21, 2, 16, 8, dtype=torch.float64, initial_state=True)
    q, k, v, g, beta, lamb, h0 = inputs
    T0 = 17
    kwargs = dict(output_final_state=True, cg_max_steps=40, cg_tol=None)
    _, state = chunk_mesa(*(x[:, :T0] for x in (q, k, v, g, beta)), lamb, h0, chunk_size=16, **kwargs)
    o, final = fused_recurrent_mesa(*(x[:, T0:] for x in (q, k, v, g, beta)), lamb, state, **kwargs)
    ref, (r_kk, r_kv) = exact(inputs)
    o_all, _ = fused_recurrent_mesa(*inputs, **kwargs)
    assert rel_err(o, ref[:, T0:]) <= 1e-10 and rel_err(o, o_all[:, T0:]) <= 1e-10
    assert rel_err(final[0], r_kk) <= 1e-12 and rel_err(final[1], r_kv) <= 1e-12


def test_varlen_equals_per_sequence():
    # the second sequence is empty: its final state is its initial state
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    N, H, K, V = 3, 2, 16, 8
    q, k, v, g, beta, lamb, _ = make_inputs(1, 7, H, K, V, dtype=torch.float64)
    h0 = make_inputs(N, 1, H, K, V, dtype=torch.float64, initial_state=True, seed=3)[6]
    kwargs = dict(output_final_state=True, cg_max_steps=30, cg_tol=1e-6, return_cg_steps=True)
    o, (h_kk, h_kv), steps = fused_recurrent_mesa(q, k, v, g, beta, lamb, h0, cu_seqlens=cu, **kwargs)
    for i, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if eos == bos:
            assert torch.equal(h_kk[i], h0[0][i]) and torch.equal(h_kv[i], h0[1][i])
            continue
        seq = [x[:, bos:eos] for x in (q, k, v, g, beta)]
        o_i, (kk_i, kv_i), steps_i = fused_recurrent_mesa(*seq, lamb, tuple(h[i:i + 1] for h in h0), **kwargs)
        assert torch.equal(steps[:, bos:eos], steps_i)
        assert rel_err(o[:, bos:eos], o_i) <= 1e-13
        assert rel_err(h_kk[i:i + 1], kk_i) <= 1e-14 and rel_err(h_kv[i:i + 1], kv_i) <= 1e-14
    o_n, _, steps_n = naive_recurrent_mesa(q, k, v, g, beta, lamb, h0, cu_seqlens=cu, **kwargs)
    assert torch.equal(steps, steps_n) and rel_err(o, o_n) <= 1e-12


def test_qk_l2norm_in_kernel():
    inputs = make_inputs(1, 4, 2, 16, 8, dtype=torch.float64)
    inputs[0], inputs[1] = inputs[0] * 3.0, inputs[1] * 0.5
    ref, _ = exact(inputs, use_qk_l2norm_in_kernel=True)
    base, _ = naive_exact_mesa(*to(inputs, torch.float32), use_qk_l2norm_in_kernel=True)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, fp32_bound(rel_err(base, ref), ON_GPU))):
        o, _ = fused_recurrent_mesa(*to(inputs, dtype), cg_max_steps=40, cg_tol=None, use_qk_l2norm_in_kernel=True)
        assert rel_err(o, ref) <= tol, f"{dtype}: {rel_err(o, ref):.2e}"


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize('K', [32, 130], ids=['H_in_registers', 'H_streamed'])
def test_qk_l2norm_in_kernel_equals_l2norm_first(monkeypatch, dtype, K):
    # the kernel's own norm against the norm of fla's L2Norm (the chunk path's `qk_l2norm`) applied first:
    # x / sqrt(Σx² + 1e-6) in float32, rounded to nearest in the input's dtype (as on a GPU; the interpreter's bf16
    # store truncates, so not fla's kernel here). The same q̂ and k̂ but for the sums' order: float32 results within
    # a few ulps; 16-bit ones equal to the bit under the interpreter (the roundings absorb the sums' last bits:
    # a rounding left out anywhere shows), on a GPU with a rounding of q̂, k̂ or o flipped by one ulp (2^-8) allowed
    from fla_mesa.ops.mesa import fused_recurrent as fr

    def norm(x):
        y = x.float()
        return (y * (1 / torch.sqrt(y.pow(2).sum(-1, keepdim=True) + 1e-6))).to(x.dtype)
    inputs = to(make_inputs(1, 4, 2, K, 8, dtype=torch.float64, initial_state=True), dtype)
    q, k = inputs[0] * 3.0, inputs[1] * 0.5
    kw = dict(initial_state=inputs[6], output_final_state=True, cg_max_steps=8, cg_tol=None)
    base = fused_recurrent_mesa(norm(q), norm(k), *inputs[2:6], **kw)
    # the kernel's own norm, not PyTorch's on the host
    monkeypatch.setattr(fr, 'l2norm', lambda x: pytest.fail('q and k normalised on the host'))
    got = fused_recurrent_mesa(q, k, *inputs[2:6], use_qk_l2norm_in_kernel=True, **kw)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8 if ON_GPU else 0
    for name, x, y in zip(['o', 'h_kk', 'h_kv'], [got[0], *got[1]], [base[0], *base[1]]):
        assert rel_err(x, y) <= tol, f"{name}: {rel_err(x, y):.2e}"


def test_outputs_fully_written():
    # conftest fills fla_mesa's torch.empty allocations with NaN (ints with -2^30): everything must be overwritten
    inputs = to(make_inputs(1, 5, 3, 20, 12, dtype=torch.float64), torch.float32)
    o, (h_kk, h_kv), steps = fused_recurrent_mesa(*inputs, output_final_state=True, return_cg_steps=True)
    assert torch.isfinite(o).all() and torch.isfinite(h_kk).all() and torch.isfinite(h_kv).all()
    assert ((steps >= 0) & (steps <= 30)).all()
    o2, final = fused_recurrent_mesa(*inputs)
    assert final is None and torch.equal(o, o2)


@pytest.mark.skipif(not INTERPRET, reason='the CPU fallback: interpreter runs only')
def test_pytorch_fallback_without_interpreter(monkeypatch):
    inputs = make_inputs(1, 4, 2, 16, 8, dtype=torch.float64, initial_state=True)
    o, final, steps = fused_recurrent_mesa(*inputs, output_final_state=True, return_cg_steps=True)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    o_t, final_t, steps_t = fused_recurrent_mesa(*inputs, output_final_state=True, return_cg_steps=True)
    assert torch.equal(steps, steps_t) and rel_err(o, o_t) <= 1e-12 and rel_err(final[0], final_t[0]) <= 1e-14


def test_backward_raises():
    inputs = make_inputs(1, 2, 1, 16, 8, dtype=torch.float32)
    q = inputs[0].clone().requires_grad_()
    o, _ = fused_recurrent_mesa(q, *inputs[1:])
    with pytest.raises(NotImplementedError, match='chunk_mesa'):
        o.sum().backward()


def test_validation_errors():
    q, k, v, g, beta, lamb, _ = make_inputs(1, 3, 2, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match='lamb'):
        fused_recurrent_mesa(q, k, v, g, beta, lamb[:, :8])
    with pytest.raises(ValueError, match='g'):
        fused_recurrent_mesa(q, k, v, -g, beta, lamb)
    with pytest.raises(ValueError, match='cg_max_steps'):
        fused_recurrent_mesa(q, k, v, g, beta, lamb, cg_max_steps=-1)
    with pytest.raises(ValueError, match='initial_state'):
        fused_recurrent_mesa(q, k, v, g, beta, lamb, initial_state=(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 8, 16)))
    with pytest.raises(ValueError, match='batch size'):
        fused_recurrent_mesa(*(torch.cat([x, x]) for x in (q, k, v, g, beta)), lamb, cu_seqlens=torch.tensor([0, 3]))
    big = torch.nn.functional.normalize(torch.randn(1, 1, 1, 300), dim=-1)
    with pytest.raises(ValueError, match='K <= 256'):
        fused_recurrent_mesa(big, big, v[:, :1, :1], g[:, :1, :1], beta[:, :1, :1], torch.ones(1, 300))


# the kernel compiled for sm_90 on any machine (no GPU needed, tests/sm90.py); run apart, as the interpreter
# replaces triton.jit
_PTX_SCRIPT = """
import sys, triton
from tests.sm90 import compile_sm90
from fla_mesa.ops.mesa import fused_recurrent as fr
types = dict(q='*fp32', k='*fp32', v='*fp32', g='*fp32', beta='*fp32', lamb='*fp32', o='*fp32', ht_kk='*fp32',
             ht_kv='*fp32', tol='fp32', max_steps='i32', T='i32', NH='i32')
consts = dict(H=1, K=16, V=8, BK=16, BV=32, BC=32, H_IN_REGS=True, SOLVE=True, PRECONDITION=True,
              DTYPE=triton.language.float32, FLOOR2=1e-19, USE_INITIAL_STATE=False, STORE_CG_STEPS=False, IS_VARLEN=False,
              QK_L2NORM=True, Q_ROUND=0, K_ROUND=0)
# without fused multiply-adds, then with them: one process (its start-up costs more than a compile)
for fusion in (False, True):
    kernel = compile_sm90(fr.fused_recurrent_mesa_fwd_kernel, types, consts, num_warps=4, enable_fp_fusion=fusion)
    sys.stdout.write(kernel.asm['ptx'] + '//// next compile ////')
"""


def test_no_fused_multiply_adds(monkeypatch):
    # FP_FUSION (fused_recurrent.py): the kernel launches without fused multiply-adds, and its sm_90 code then has
    # none (with them it has: the check can fail), so every warp's copy of the CG vectors, and its exit from the
    # loop, agree to the bit
    from fla_mesa.ops.mesa import fused_recurrent as fr
    launches = []
    kernel = fr.fused_recurrent_mesa_fwd_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(fr, 'fused_recurrent_mesa_fwd_kernel', Recorder())
    fused_recurrent_mesa(*make_inputs(1, 2, 1, 16, 8, dtype=torch.float32))
    assert launches and launches[0]['enable_fp_fusion'] is False

    done = run_apart(_PTX_SCRIPT)
    assert done.returncode == 0, done.stderr[-2000:]
    ptxs = done.stdout.split('//// next compile ////')[:-1]
    assert len(ptxs) == 2
    for fusion, ptx in zip((False, True), ptxs):
        assert 'shfl.sync' in ptx and ('fma.rn.f32' in ptx) == fusion
