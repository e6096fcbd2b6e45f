# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Running states over many chunks (op README, "Compensated state passes"): the forward state pass's chunk-start states,
the backward's state gradients and the PyTorch path's states against float64, at T = 8192 (128 chunks), keys from 4
directions, values and upstream gradients with a common mean, so that every state grows with T.

The reference sums in float64 the path's own float32 chunk terms and decays (the decays' float32 rounding, a
slightly different γ, is not what is tested), so that what is compared is the running sum alone. The bound is twice
the float32 storage floor, the error of the float64 states rounded once to float32 (on a GPU 16x for the split
tf32x3 / bf16x3 products, whose own error is 5-15x the floor there). A running state added chunk by
chunk in plain float32 loses about half an ulp of itself at every chunk: 6-10x the floor here under the interpreter
(γ = 1 and 0.9999); carried compensated, 1.1-1.2x. With γ = 0.9999 the decay's own rounding counts too: 5x the
floor without its compensation term (the exact product error), in either path.
"""

import pytest
import torch
import torch.nn.functional as F

from fla_mesa.ops.mesa.chunk_torch import ChunkPieces
from fla_mesa.ops.mesa.kernel_utils import RCP_LN2
from fla_mesa.utils import is_interpreting
from tests.utils import rel_err

DEVICE = 'cuda' if torch.cuda.is_available() and not is_interpreting() else 'cpu'
triton_only = pytest.mark.skipif(not (is_interpreting() or torch.cuda.is_available()),
                                  reason="needs TRITON_INTERPRET=1 or a GPU")
T, K, V, C = 8192, 32, 32, 64


def long_inputs(seed=0):
    """float32 `[1, T, 1, ·]`: unit keys from 4 directions + noise 1e-2, values and `do` of mean 1, β = 0.99, γ = 1."""
    gen = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(4, K, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(dirs[torch.randint(0, 4, (T,), generator=gen)] + 1e-2 * torch.randn(T, K, generator=gen,
                                                                                            dtype=torch.float64), dim=-1)
    v = 1 + 0.5 * torch.randn(T, V, generator=gen, dtype=torch.float64)
    do = 1 + 0.5 * torch.randn(T, V, generator=gen, dtype=torch.float64)
    e = k + 0.1 * torch.randn(T, K, generator=gen, dtype=torch.float64)
    beta = torch.full((T,), 0.99, dtype=torch.float64)
    return [x.float()[None, :, None] for x in (k, v, do, e, beta)]


def chunked(x):
    """`[1, T, 1, ...]` as `[NT, C, ...]`."""
    return x[0, :, 0].reshape(-1, C, *x.shape[3:])


def log_decays(gamma):
    """`g [1, T, 1]` float32 (natural log) and the Triton passes' `g_cum` (log2 space, summed within chunks)."""
    g = torch.full((1, T, 1), gamma, dtype=torch.float64).log().float()
    return g, (chunked(g) * RCP_LN2).cumsum(-1).reshape(1, T, 1)


def forward_sums(a, b, d):
    """float64 `S ← d_c S + a_cᵀ b_c` over the chunks (float32 `a [NT, C, ·]`, `b`, `d [NT]`): the states before
    every chunk and after the last."""
    s, out = torch.zeros(a.shape[-1], b.shape[-1], dtype=torch.float64), []
    for c in range(a.shape[0]):
        out.append(s)
        s = d[c].double() * s + a[c].double().T @ b[c].double()
    return torch.stack(out), s


def backward_sums(a, b, d):
    """float64 `D ← d_c D + a_cᵀ b_c` from the last chunk back: the gradients after every chunk and before the first."""
    out, s = forward_sums(a.flip(0), b.flip(0), d.flip(0))
    return out.flip(0), s


def check(name, x, ref, bound=2):
    err, floor = rel_err(x, ref), rel_err(ref.float(), ref)
    assert err <= bound * floor, f"{name}: relative error {err:.2e}, {err / floor:.1f}x the storage floor {floor:.2e}"


def product_bound(precision):
    # on a GPU, tf32x3's chunk products themselves (the lo·lo term dropped) are 7-9x the storage floor at this T; the
    # running sum without compensation was over 1000x (benchmarks/results/solver_h200.md, section 7)
    return 2 if precision == 'ieee' or is_interpreting() else 16


# γ < 1 on the interpreter only: a GPU's exp2 is approximate, so its decays are not the ones the reference rebuilds
gammas = pytest.mark.parametrize('gamma', [1.0, pytest.param(0.9999, marks=pytest.mark.skipif(
    not is_interpreting(), reason="the GPU's decays (approximate exp2) are not reproducible on the CPU"))])


def triton_state_pass(test):
    """The Triton state passes' cases: both γ, ieee and 'auto' products."""
    return triton_only(gammas(pytest.mark.parametrize('precision', ['ieee', 'auto'])(test)))


def chunk_decays(gamma):
    """Γ (cumulative log2 decays), its chunks and the decay exp2(Γ_C) of each chunk."""
    _, g_cum = log_decays(gamma)
    gc = chunked(g_cum)
    return g_cum, gc, torch.exp2(gc[:, -1])


@triton_state_pass
def test_forward_state_pass(precision, gamma):
    from fla_mesa.ops.mesa.chunk_h import chunk_mesa_fwd_states
    k, v, _, _, beta = long_inputs()
    g_cum, gc, d = chunk_decays(gamma)
    h_kk, h_kv, final = chunk_mesa_fwd_states(*(x.to(DEVICE) for x in (k, v, g_cum, beta)), output_final_state=True,
                                              chunk_size=C, precision=precision)
    # the kernel's float32 terms: k_j exp2(Γ_C − Γ_j) β_j
    kd = chunked(k) * (torch.exp2(gc[:, -1:] - gc) * chunked(beta))[..., None]
    for name, w, state, last in (('h_kk', k, h_kk, final[0]), ('h_kv', v, h_kv, final[1])):
        ref, ref_last = forward_sums(kd, chunked(w), d)
        check(name, state[0, :, 0], ref, product_bound(precision))
        check('final ' + name, last[0, 0], ref_last, product_bound(precision))


@triton_state_pass
def test_backward_state_pass(precision, gamma):
    from fla_mesa.ops.mesa.chunk_h import chunk_mesa_bwd_dh
    x, _, do, e, _ = long_inputs()
    g_cum, gc, d = chunk_decays(gamma)
    dh_kk, dh_kv, dh0 = chunk_mesa_bwd_dh(*(t.to(DEVICE) for t in (x, e, do, g_cum)), output_dh0=True, chunk_size=C,
                                          precision=precision)
    # the kernel's float32 terms: SIGN a_i exp2(Γ_i) (dH_t = −e_t x_tᵀ, dS_t = x_t do_tᵀ)
    for name, sign, a, b, state, first in (('dh_kk', -1.0, e, x, dh_kk, dh0[0]), ('dh_kv', 1.0, x, do, dh_kv, dh0[1])):
        ref, ref_first = backward_sums(chunked(a) * (sign * torch.exp2(gc))[..., None], chunked(b), d)
        check(name, state[0, :, 0], ref, product_bound(precision))
        check(name.replace('dh', 'dh0'), first[0, 0], ref_first, product_bound(precision))


@pytest.mark.parametrize('gamma', [1.0, 0.9999])
def test_pytorch_path_states(gamma):
    k, v, _, _, beta = long_inputs()
    g, _ = log_decays(gamma)
    pieces = ChunkPieces(k, v, g, beta, torch.full((1, K), 0.25), None, C)
    # the path's float32 terms, as `ChunkPieces` forms them
    gc = chunked(g).cumsum(-1)
    kw, d = chunked(k) * ((gc[:, -1:] - gc).exp() * chunked(beta))[..., None], gc[:, -1].exp()
    for name, w, state, last in (('h_kk', k, pieces.H, pieces.final_state[0]),
                                 ('h_kv', v, pieces.S, pieces.final_state[1])):
        ref, ref_last = forward_sums(kw, chunked(w), d)
        check(name, state[0, 0], ref)
        check('final ' + name, last[0, 0], ref_last)




@triton_only
def test_state_passes_launch_without_fused_multiply_adds(monkeypatch):
    # STATE_FP_FUSION (chunk_h.py): `_decay_add`'s TwoSum needs its adds rounded on their own (compiled for sm_90 with
    # fusion on, the forward pass has 6x the fma instructions of its explicit `tl.fma`s)
    from fla_mesa.ops.mesa import chunk_h
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ('chunk_mesa_fwd_kernel_h', 'chunk_mesa_bwd_kernel_dh'):
        monkeypatch.setattr(chunk_h, name, Recorder(getattr(chunk_h, name)))
    k, v, do, e, beta = (x[:, :100].to(DEVICE) for x in long_inputs())
    g_cum = torch.zeros_like(beta)
    chunk_h.chunk_mesa_fwd_states(k, v, g_cum, beta, chunk_size=C)
    chunk_h.chunk_mesa_bwd_dh(k, e, do, g_cum, chunk_size=C)
    assert [kw['enable_fp_fusion'] for kw in launches] == [False, False]
