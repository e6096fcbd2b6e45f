# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The chunk path's forward kernels (`chunk_mesa_fwd_states`, `chunk_mesa_cg`) against float64 references.

Tolerances: under TRITON_INTERPRET=1 every product is an fp32 numpy matmul, so the states are fp32 sums of
at most a few hundred terms (relative error ~1e-7; we allow 2e-6), and a converged fp32 CG solve of a system with
condition number κ ≲ 1e2 is good to ~κ·1e-7 (we allow 2e-5). Against the PyTorch solver (`cg_solve`, fp32, same
algorithm) x agrees to rounding (1e-5) and the step counts agree exactly once a tolerance is set (with
`cg_tol=None` a row stops at the residual floor `residual_floor2`, reached at a step that depends on rounding, so
counts are compared only with a tolerance).
"""

import pytest
import torch

from fla.ops.utils import chunk_local_cumsum, prepare_chunk_indices

from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
from fla_mesa.ops.mesa.chunk_h import chunk_mesa_fwd_states
from fla_mesa.ops.mesa.chunk_torch import ChunkPieces
from fla_mesa.ops.mesa.kernel_utils import RCP_LN2
from fla_mesa.ops.mesa.solver import cg_solve
from fla_mesa.ops.mesa.utils import pad_varlen, unpad_varlen
from fla_mesa.utils import is_interpreting
from tests.utils import assert_rel, make_inputs, rel_err

pytestmark = pytest.mark.skipif(
    not (is_interpreting() or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or a GPU"
)
DEVICE = 'cuda' if torch.cuda.is_available() and not is_interpreting() else 'cpu'


def reference(k, v, g, beta, lamb, q, h0, cu_seqlens, chunk_size):
    """float64, token by token: chunk-start states, exact x_t = (H_t + Λ)⁻¹ q_t, o_t = S_tᵀ x_t, final states."""
    k, v, g, beta, lamb, q = (t.double().cpu() for t in (k, v, g, beta, lamb, q))
    B, T, H, K = k.shape
    V = v.shape[-1]
    bounds = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, s, e) for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    h_kk, h_kv, finals_kk, finals_kv = [], [], [], []
    x = torch.zeros(B, T, H, K, dtype=torch.float64)
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    A_lamb = torch.diag_embed(lamb)
    for n, (b, bos, eos) in enumerate(bounds):
        Hs = torch.zeros(H, K, K, dtype=torch.float64) if h0 is None else h0[0][n].double().cpu().clone()
        Ss = torch.zeros(H, K, V, dtype=torch.float64) if h0 is None else h0[1][n].double().cpu().clone()
        hk, hv = [], []
        for t in range(bos, eos):
            if (t - bos) % chunk_size == 0:
                hk.append(Hs.clone())
                hv.append(Ss.clone())
            gamma = g[b, t].exp()[:, None, None]
            kb = k[b, t] * beta[b, t, :, None]
            Hs = gamma * Hs + kb[:, :, None] * k[b, t, :, None, :]
            Ss = gamma * Ss + kb[:, :, None] * v[b, t, :, None, :]
            x[b, t] = torch.linalg.solve(Hs + A_lamb, q[b, t])
            o[b, t] = torch.einsum('hk,hkv->hv', x[b, t], Ss)
        h_kk.append(torch.stack(hk))
        h_kv.append(torch.stack(hv))
        finals_kk.append(Hs)
        finals_kv.append(Ss)
    if cu_seqlens is None:
        h_kk, h_kv = torch.stack(h_kk), torch.stack(h_kv)
    else:
        h_kk, h_kv = torch.cat(h_kk)[None], torch.cat(h_kv)[None]
    return h_kk, h_kv, (torch.stack(finals_kk), torch.stack(finals_kv)), x, o


def run_kernels(q, k, v, g, beta, lamb, h0, cu_seqlens, chunk_size, cg_max_steps, cg_tol, precondition, **kw):
    chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size) if cu_seqlens is not None else None
    g_cum = chunk_local_cumsum(g, chunk_size, scale=RCP_LN2, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
    h_kk, h_kv, final = chunk_mesa_fwd_states(
        k, v, g_cum, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
        chunk_indices=chunk_indices, chunk_size=chunk_size, precision=kw.get('state_precision', 'ieee'),
    )
    x, steps, o = chunk_mesa_cg(
        q, k, g_cum, beta, lamb, h_kk, cg_max_steps, cg_tol, precondition, cu_seqlens=cu_seqlens,
        chunk_indices=chunk_indices, chunk_size=chunk_size, v=v, h_kv=h_kv,
        precision=kw.get('precision', 'ieee'), readout_precision=kw.get('readout_precision', 'ieee'),
    )
    return h_kk, h_kv, final, x, steps, o


def torch_solver(q, k, v, g, beta, lamb, h0, cu_seqlens, chunk_size, cg_max_steps, cg_tol, precondition):
    """The PyTorch chunkwise CG (the same solver) in float32: x and step counts."""
    if cu_seqlens is not None:
        q, k, v, g, beta = (pad_varlen(t, cu_seqlens) for t in (q, k, v, g, beta))
    pieces = ChunkPieces(k, v, g, beta, lamb, h0, chunk_size)
    x, steps = cg_solve(pieces.matvec, pieces.chunk(q), pieces.diag, cg_max_steps, cg_tol, precondition)
    x, steps = pieces.unchunk(x), pieces.unchunk(steps)
    if cu_seqlens is not None:
        x, steps = unpad_varlen(x, cu_seqlens), unpad_varlen(steps, cu_seqlens)
    return x, steps


def make(B, T, H, K, V, gate=(3.0, 1.0), initial_state=False, seed=0):
    q, k, v, g, beta, lamb, h0 = make_inputs(B, T, H, K, V, dtype=torch.float32, gate=gate,
                                             initial_state=initial_state, seed=seed, device=DEVICE)
    return q, k, v, g, beta, lamb, h0


CASES = [
    # B, T, H, K, V, cu_seqlens, chunk, gate, initial_state
    pytest.param(1, 1, 1, 16, 16, None, 64, (3.0, 1.0), False, id='T1'),
    pytest.param(2, 63, 2, 16, 32, None, 64, (3.0, 1.0), True, id='T63-KneV-h0'),
    pytest.param(1, 130, 1, 32, 16, None, 32, (9.0, 0.5), False, id='T130-gates-near-1'),
    pytest.param(1, 130, 2, 16, 24, [0, 1, 40, 63, 130], 32, (3.0, 1.0), True, id='varlen-h0'),
    pytest.param(1, 100, 1, 20, 20, [0, 50, 100], 16, (6.0, 1.0), False, id='varlen-K20-C16'),
    # K > 128: H_c re-read every step; the interpreter only (on a GPU the tile needs more shared memory than an H100
    # has, the kernel says so, and chunk_mesa takes the PyTorch path there)
    pytest.param(1, 40, 1, 160, 48, None, 32, (3.0, 1.0), True, id='K160-V48',
                 marks=pytest.mark.skipif(not is_interpreting(), reason='K > 128: interpreter only')),
]


@pytest.mark.parametrize('B, T, H, K, V, cu, C, gate, h0', CASES)
def test_states_and_exact_solve(B, T, H, K, V, cu, C, gate, h0):
    """States vs float64; 40 fixed steps of CG (cg_tol=None) reach the exact solve to fp32 level; readout too."""
    q, k, v, g, beta, lamb, h0 = make(B, T, H, K, V, gate, h0)
    if cu is not None:
        if h0 is not None:
            # one initial state per sequence, all different
            h0 = tuple(torch.stack([h[0] * (1 + i) for i in range(len(cu) - 1)]) for h in h0)
        cu = torch.tensor(cu, dtype=torch.long, device=DEVICE)
    h_kk, h_kv, final, x, steps, o = run_kernels(q, k, v, g, beta, lamb, h0, cu, C, 40, None, True)
    r_kk, r_kv, r_final, r_x, r_o = reference(k, v, g, beta, lamb, q, h0, cu, C)
    assert_rel('h_kk', h_kk, r_kk, 2e-6)
    assert_rel('h_kv', h_kv, r_kv, 2e-6)
    assert_rel('final h_kk', final[0], r_final[0], 2e-6)
    assert_rel('final h_kv', final[1], r_final[1], 2e-6)
    assert_rel('x', x, r_x, 2e-5)
    assert_rel('o', o, r_o, 2e-5)
    assert steps.min() >= 0 and steps.max() <= 40


@pytest.mark.parametrize('precondition', [False, True])
@pytest.mark.parametrize('case', [0, 1], ids=['T130-h0', 'varlen'])
def test_steps_match_torch_solver(case, precondition):
    """
    cg_tol=1e-4: x and the per-token step counts equal the PyTorch solver's on the same fp32 inputs. In the varlen
    case (initial states up to 4x larger, κ higher, 10-16 steps) a few rows end their last step with ‖r‖ within
    rounding of tol, where two fp32 implementations (or fp32 vs fp64) may differ by one step: at most 5% of the
    tokens and by one step there (fp32 torch vs fp64 torch differ at the same rate).
    """
    if case == 0:
        q, k, v, g, beta, lamb, h0 = make(2, 130, 2, 32, 16, (6.0, 1.0), True, seed=1)
        cu, C = None, 64
    else:
        q, k, v, g, beta, lamb, h0 = make(1, 130, 2, 16, 16, (3.0, 1.0), True, seed=2)
        h0 = tuple(torch.stack([h[0] * (1 + i) for i in range(4)]) for h in h0)
        cu, C = torch.tensor([0, 1, 40, 63, 130], dtype=torch.long, device=DEVICE), 32
    # an all-zero right-hand side: x = 0 in 0 steps, no NaN
    q[:, 5] = 0
    _, _, _, x, steps, _ = run_kernels(q, k, v, g, beta, lamb, h0, cu, C, 30, 1e-4, precondition)
    r_x, r_steps = torch_solver(q, k, v, g, beta, lamb, h0, cu, C, 30, 1e-4, precondition)
    assert_rel('x vs torch solver', x, r_x, 1e-5)
    diff = (steps.cpu() - r_steps.cpu()).abs()
    if case == 0:
        assert torch.equal(steps.cpu(), r_steps.cpu()), f"steps differ at {(diff > 0).sum()} tokens"
    else:
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.05, f"steps differ at {(diff > 0).sum()} tokens"
    assert (steps[:, 5] == 0).all() and (x[:, 5] == 0).all()
    assert 0 < steps.float().mean() < 30
    # the converged error is about cg_tol (relative residual) times the conditioning
    _, _, _, r_xe, _ = reference(k, v, g, beta, lamb, q, h0, cu, C)
    assert rel_err(x, r_xe) < 1e-3


def test_scale_invariance():
    """b scaled by 1e-8 or 1e8: x scales exactly along, same step counts (no absolute epsilon anywhere)."""
    q, k, v, g, beta, lamb, _ = make(1, 64, 2, 16, 16, (3.0, 1.0), False, seed=3)
    _, _, _, x, steps, o = run_kernels(q, k, v, g, beta, lamb, None, None, 64, 30, 1e-4, True)
    for s in (1e-8, 1e8):
        _, _, _, xs, steps_s, os_ = run_kernels(q * s, k, v, g, beta, lamb, None, None, 64, 30, 1e-4, True)
        assert torch.equal(steps, steps_s)
        assert_rel(f'x at scale {s}', xs / s, x, 1e-6)
        assert_rel(f'o at scale {s}', os_ / s, o, 1e-6)


def test_no_readout_and_bf16_inputs():
    """The adjoint call (no v/h_kv) returns o = None; bf16 q/k/v are read as they are."""
    q, k, v, g, beta, lamb, _ = make(1, 63, 2, 16, 16, (3.0, 1.0), False, seed=4)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    h_kk, h_kv, _, x, steps, o = run_kernels(q, k, v, g, beta, lamb, None, None, 64, 40, None, True)
    g_cum = chunk_local_cumsum(g, 64, scale=RCP_LN2)
    x2, steps2, o2 = chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, 40, None, True, precision='ieee')
    assert o2 is None
    if is_interpreting():
        # one config under the interpreter: the same arithmetic, bit for bit
        assert torch.equal(x, x2) and torch.equal(steps, steps2)
    else:
        # on a GPU the autotuner may split the rows differently without the readout: the same solve to rounding
        assert_rel('x', x2, x, 1e-6)
        assert (steps - steps2).abs().max() <= 1
    _, _, _, r_x, r_o = reference(k, v, g, beta, lamb, q, None, None, 64)
    assert_rel('x', x, r_x, 2e-5)
    assert_rel('o', o, r_o, 2e-5)


# about 3x the worst error of the interpreter's runs; on a GPU tf32 rounds its operands to 10 mantissa bits (2^-11
# relative each, compounded by the CG steps), where the interpreter multiplies them as fp32: there the tf32 bounds are
# those of its rounding. The interpreter's tf32 solve stops at tf32's residual floor (`residual_floor2`, 8e-6
# relative), its x 4e-6 off where tf32x3's (a floor of 4e-9) is on float32's
PRECISION_TOLS = [('bf16', 2e-2), ('bf16x3', 1e-4), ('tf32', 1.5e-5 if is_interpreting() else 1e-2),
                  ('tf32x3', 6e-7 if is_interpreting() else 2e-5)]


@pytest.mark.parametrize('kv_bf16', [False, True])
@pytest.mark.parametrize('precision, tol', PRECISION_TOLS)
def test_precisions(precision, tol, kv_bf16):
    """
    Every operand precision runs (states, CG and readout all in it). The interpreter emulates the bf16 ones exactly
    (round operands to bf16, multiply in fp32) and runs tf32 as fp32 (so tf32's rounding is tested on a GPU only);
    with bf16 k and v, 'tf32x3' and 'bf16x3' split only the other operand.
    """
    q, k, v, g, beta, lamb, h0 = make(1, 63, 1, 16, 16, (3.0, 1.0), True, seed=5)
    if kv_bf16:
        k, v = k.bfloat16(), v.bfloat16()
    _, _, _, x, _, o = run_kernels(q, k, v, g, beta, lamb, h0, None, 64, 40, None, True,
                                   precision=precision, state_precision=precision, readout_precision=precision)
    _, _, _, r_x, r_o = reference(k, v, g, beta, lamb, q, h0, None, 64)
    assert_rel(f'x ({precision})', x, r_x, tol)
    assert_rel(f'o ({precision})', o, r_o, tol)


@pytest.mark.parametrize('kv_bf16', [False, True])
@pytest.mark.parametrize('precision', ['tf32x3', 'bf16x3'])
@pytest.mark.parametrize('cg_tol', [None, 1e-4])
def test_rounded_directions(precision, kv_bf16, cg_tol):
    """
    `round_directions=True` rounds each CG direction to the split's high part and moves x and r along it: 5 products a
    step instead of 7. Against float64 it must be as accurate as the plain solve (measured within 1.1x; bound 1.5x,
    floor 2e-6), in at most 10% more steps (measured 0-5%), and run a different iteration (the option reaches the
    kernel). The interpreter rounds as the GPU does (explicit bf16/tf32 rounding, products of the rounded values).
    """
    q, k, v, g, beta, lamb, h0 = make(1, 130, 2, 32, 16, (6.0, 1.0), True, seed=6)
    if kv_bf16:
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    g_cum = chunk_local_cumsum(g, 64, scale=RCP_LN2)
    h_kk, h_kv, _ = chunk_mesa_fwd_states(k, v, g_cum, beta, initial_state=h0, chunk_size=64)
    _, _, _, r_x, r_o = reference(k, v, g, beta, lamb, q, h0, None, 64)
    x, steps, o = chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, 60, cg_tol, True, v=v, h_kv=h_kv, precision=precision,
                                round_directions=False)
    x_r, steps_r, o_r = chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, 60, cg_tol, True, v=v, h_kv=h_kv,
                                      precision=precision, round_directions=True)
    assert not torch.equal(x_r, x)
    for name, a, b, ref in (('x', x_r, x, r_x), ('o', o_r, o, r_o)):
        assert rel_err(a, ref) <= max(1.5 * rel_err(b, ref), 2e-6), f"{name}: {rel_err(a, ref):.2e} vs {rel_err(b, ref):.2e}"
    assert steps_r.float().mean() <= 1.1 * steps.float().mean()


def test_auto_precision():
    """
    'auto' (the default) is tf32x3 for fp32 keys and bf16x3 for bf16 keys; with bf16 q/k/v and gates near 1 the bf16x3
    solve stays within 5e-5 of float64 on the same rounded inputs (1.6e-5 here): 20x under a bf16 output's rounding.
    """
    q, k, v, g, beta, lamb, h0 = make(1, 63, 2, 32, 16, (6.0, 1.0), True, seed=6)
    g_cum = chunk_local_cumsum(g, 64, scale=RCP_LN2)
    for dtype, same in ((torch.float32, 'tf32x3'), (torch.bfloat16, 'bf16x3')):
        q_, k_, v_ = (t.to(dtype) for t in (q, k, v))
        h_kk, h_kv, _ = chunk_mesa_fwd_states(k_, v_, g_cum, beta, initial_state=h0, chunk_size=64)
        auto = chunk_mesa_cg(q_, k_, g_cum, beta, lamb, h_kk, 40, None, True, v=v_, h_kv=h_kv)
        fixed = chunk_mesa_cg(q_, k_, g_cum, beta, lamb, h_kk, 40, None, True, v=v_, h_kv=h_kv, precision=same)
        assert all(torch.equal(a, b) for a, b in zip(auto, fixed)), dtype
    _, _, _, r_x, r_o = reference(k_, v_, g, beta, lamb, q_, h0, None, 64)
    assert_rel('x (auto, bf16 inputs)', auto[0], r_x, 5e-5)
    assert_rel('o (auto, bf16 inputs)', auto[2], r_o, 5e-5)


def test_gpu_configs_avoid_wgmma(monkeypatch):
    # 64 rows at 4 warps is the one CG config Triton lowers to wgmma, and Triton 3.6 miscompiles it on Hopper with
    # bf16 keys (faults, or outputs 100% off: benchmarks/results/gpu_tests_h200.md); every row split left keeps <= 32
    from fla_mesa.ops.mesa import chunk_cg
    monkeypatch.setattr(chunk_cg, 'is_interpreting', lambda: False)
    configs = chunk_cg._cg_configs()
    assert configs and all(64 // c.kwargs['NR'] <= 32 for c in configs)


@pytest.mark.parametrize('BT', [16, 32, 64])
def test_gpu_configs_every_chunk_size(monkeypatch, BT):
    # the GPU list holds no 16-row program for a 16-token chunk at 2+ splits: pruning must still leave a config
    # (an empty list failed every chunk_size=16 call on an H200), each with at least 16 rows
    from fla_mesa.ops.mesa import chunk_cg
    monkeypatch.setattr(chunk_cg, 'is_interpreting', lambda: False)
    kept = chunk_cg._prune_cg_configs(chunk_cg._cg_configs(), None, BT=BT)
    assert kept and all(BT // c.kwargs['NR'] >= 16 for c in kept)


def test_bad_arguments():
    q, k, v, g, beta, lamb, _ = make(1, 16, 1, 16, 16)
    g_cum = chunk_local_cumsum(g, 16, scale=RCP_LN2)
    h_kk = torch.zeros(1, 1, 1, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match='precision'):
        chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, 5, None, True, chunk_size=16, precision='fp8')
    with pytest.raises(ValueError, match='chunk_size'):
        chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, 5, None, True, chunk_size=128)
    with pytest.raises(ValueError, match='together'):
        chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, 5, None, True, chunk_size=16, v=v)
