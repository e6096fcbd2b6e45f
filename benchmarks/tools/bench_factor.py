# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The chunk-start factor on a GPU (issue 14): the Triton kernel (`factor.chunk_start_factor_triton`, a few launch
configurations) against `precond.chunk_start_factor` (torch, float64) and the same in float32, timed at 4096 and
1024 matrices of 128×128 (B·T = 16384 and 4096, H = 16, chunk 64), and ‖W Wᵀ M − I‖_F of each on the chunk path's
own states (`chunk_mesa_fwd_states`) for three key families. Prints a markdown table; about a minute with compiles.

    python benchmarks/tools/bench_factor.py [--out FILE] [--configs 0,1,...]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from triton.testing import do_bench

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(BENCHMARKS), BENCHMARKS]

from fla.ops.utils import chunk_local_cumsum  # noqa: E402
from fla.ops.utils.constant import RCP_LN2  # noqa: E402

from fla_mesa.ops.mesa.chunk_h import chunk_mesa_fwd_states  # noqa: E402
from fla_mesa.ops.mesa.factor import chunk_start_factor_triton  # noqa: E402
from fla_mesa.ops.mesa.precond import chunk_end_states, chunk_start_factor  # noqa: E402
from tests.ops.test_hard_states import hard_inputs  # noqa: E402

from benchmark_chunk import header, make_inputs  # noqa: E402

H, K, BT = 16, 128, 64
# (block_size, num_warps, precision, maxnreg): few, so that compiling stays short
CONFIGS = [
    (32, 4, 'tf32x3', None),
    (32, 4, 'tf32', None),
    (16, 1, 'tf32x3', None),
    (16, 2, 'tf32x3', 128),
    (32, 8, 'tf32x3', None),
]
LINES = []


def log(s='', out=None):
    print(s, flush=True)
    LINES.append(s)
    if out:
        with open(out, 'w') as f:
            f.write("\n".join(LINES) + "\n")


def torch_factor_fp32(h_kk, a, lamb, dtype):
    # `chunk_start_factor` with the factorisation in float32 (the float32 variant of factor_variants_cpu.md)
    m = a.float()[..., None, None] * h_kk.float()
    m = (m + m.transpose(-1, -2)) / 2 + torch.diag_embed(lamb.float().expand(*a.shape, h_kk.shape[-1]))
    L, info = torch.linalg.cholesky_ex(m)
    d = torch.diagonal(m, dim1=-2, dim2=-1).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    L = torch.where((info != 0)[..., None, None], torch.diag_embed(d), L)
    eye = torch.eye(h_kk.shape[-1], device=m.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2).to(dtype)


def states(T, family):
    """
    (h [1, NT, H, K, K], a [1, NT, H], lamb [H, K]) of the Triton chunk path at B = 1: `h = H_c + H_{c+1}` and
    `a = 1/2`, so that `a h + Λ` is the chunk preconditioner's `M_c` (summed here once: the library's kernel reads
    the two states in place, `ht_kk=`).
    """
    if family == 'random keys (benchmark_chunk)':
        _, k, v, g, beta, lamb = make_inputs(1, T, H, K, device='cuda')
    else:
        kw = dict(dirs=8, noise=1e-2) if family == '8 directions + noise' else dict(dirs=0, anisotropic=True)
        _, k, v, g, beta, lamb = (x.cuda() for x in hard_inputs(T, H=H, K=K, V=K, **kw))
        k, v = k.bfloat16(), v.bfloat16()
    g_cum = chunk_local_cumsum(g.float(), BT, scale=RCP_LN2)
    h_kk, _, (ht_kk, _) = chunk_mesa_fwd_states(k, v, g_cum, beta.float(), output_final_state=True, chunk_size=BT)
    return h_kk + chunk_end_states(h_kk, ht_kk), h_kk.new_full(h_kk.shape[:3], 0.5), lamb.float()


def residual(w, h_kk, a, lamb):
    """Per matrix ‖W Wᵀ M − I‖_F in float64."""
    m = a.double()[..., None, None] * h_kk.double()
    m = (m + m.transpose(-1, -2)) / 2 + torch.diag_embed(lamb.double().expand(*a.shape, K))
    w = w.double()
    return (w @ (w.transpose(-1, -2) @ m) - torch.eye(K, dtype=torch.float64, device=w.device)).flatten(-2).norm(dim=-1)


def methods(configs):
    out = [('torch float64 (precond.chunk_start_factor)', chunk_start_factor),
           ('torch float32', torch_factor_fp32)]
    for bs, nw, prec, nreg in configs:
        def fn(h, a, lamb, dtype, bs=bs, nw=nw, prec=prec, nreg=nreg):
            return chunk_start_factor_triton(h, a, lamb, dtype, precision=prec, block_size=bs, num_warps=nw,
                                             maxnreg=nreg)
        out.append((f"Triton BS={bs}, warps={nw}, {prec}" + (f", maxnreg={nreg}" if nreg else ''), fn))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default=None)
    parser.add_argument('--configs', default=','.join(str(i) for i in range(len(CONFIGS))))
    args = parser.parse_args()
    configs = [CONFIGS[int(i)] for i in args.configs.split(',')]
    meths = methods(configs)
    log(f"# Chunk preconditioner factor: Triton kernel against torch (issue 14)\n\n{header()}\n", args.out)
    log("`python benchmarks/tools/bench_factor.py`. H = 16, K = 128, chunk 64, the chunk path's float32 states; "
        "W in float32. Time: `triton.testing.do_bench` median (ms) on the random-key states. Accuracy: "
        "‖W Wᵀ M − I‖_F per matrix for W rounded to float32 (every method), median / max over the 4096 "
        "matrices, and how many fell back to the diagonal (of those whose M is not diagonal).\n", args.out)
    data = {T: states(T, 'random keys (benchmark_chunk)') for T in (16384, 4096)}
    times = {}
    for name, fn in meths:
        for T, (h, a, lamb) in data.items():
            times[name, T] = do_bench(lambda: fn(h, a, lamb, torch.float32), warmup=25, rep=100)
    families = ['random keys (benchmark_chunk)', '8 directions + noise', 'anisotropic, γ = 0.9999']
    acc = {}
    for fam in families:
        h, a, lamb = data[16384] if fam == families[0] else states(16384, fam)
        m = a.double()[..., None, None] * h.double()
        m = (m + m.transpose(-1, -2)) / 2 + torch.diag_embed(lamb.double().expand(*a.shape, K))
        # every 8th chunk from the second: an eigensolver over all 4096 takes longer than the rest
        ev = torch.linalg.eigvalsh(m[:, 1::8])
        kappa = ev[..., -1] / ev[..., 0]
        acc[fam, 'kappa'] = f"{kappa.median().item():.1e} / {kappa.max().item():.1e}"
        # a diagonal W is a fallback unless M is diagonal itself
        full = (m.triu(1) != 0).flatten(-2).any(-1)
        del m, ev
        for name, fn in meths:
            w = fn(h, a, lamb, torch.float32)
            r = residual(w, h, a, lamb)
            fallback = ((w.triu(1) == 0).flatten(-2).all(-1) & full).sum().item()
            acc[fam, name] = f"{r.median().item():.1e} / {r.max().item():.1e} / {fallback}"
    log("| method | ms, 4096 matrices | ms, 1024 matrices | " + " | ".join(families) + " |", args.out)
    log("|---|---|---|" + "---|" * len(families), args.out)
    log("| cond(M) median / max (every 8th chunk) | | | " + " | ".join(acc[f, 'kappa'] for f in families) + " |", args.out)
    for name, _ in meths:
        log(f"| {name} | {times[name, 16384]:.3f} | {times[name, 4096]:.3f} | "
            + " | ".join(acc[f, name] for f in families) + " |", args.out)


if __name__ == '__main__':
    main()
