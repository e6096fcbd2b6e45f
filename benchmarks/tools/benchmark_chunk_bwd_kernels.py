# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The chunk path's backward kernels on a GPU: accuracy against float64 (operand precisions 'ieee' and 'tf32x3',
upstream gradients of scale 1, 1e-4, 1e-8, bf16 k/v/do) and time at B·T = 16384, H = 16, D = 128.

    python benchmarks/tools/benchmark_chunk_bwd_kernels.py [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(BENCHMARKS), BENCHMARKS]

from fla.ops.utils import prepare_chunk_indices  # noqa: E402

from fla_mesa.ops.mesa import chunk_bwd  # noqa: E402
from fla_mesa.ops.mesa.chunk_bwd import chunk_mesa_bwd_grads  # noqa: E402
from fla_mesa.ops.mesa.chunk_o import chunk_mesa_bwd_dx  # noqa: E402
from fla_mesa.ops.mesa.chunk_h import chunk_mesa_bwd_dh  # noqa: E402
# the float64 reference the tests check the kernels against (computed on the CPU)
from tests.ops.test_chunk_bwd_kernels import g_cumsum, reference  # noqa: E402

from benchmark_chunk import header  # noqa: E402

DEV = 'cuda'
NAMES = ('dk', 'dv', 'dg', 'dbeta', 'dlamb', 'dh0_kk', 'dh0_kv')
LINES = []


OUT_FILE = None


def log(s=''):
    print(s, flush=True)
    LINES.append(s)
    if OUT_FILE:
        with open(OUT_FILE, 'w') as f:
            f.write("\n".join(LINES) + "\n")


def rel(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float('inf')
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make(B, T, H, K, V, cu=None, scale=1.0, seed=0, gate=(3.0, 1.0)):
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)
    N = B if cu is None else len(cu) - 1
    q, k = F.normalize(randn(B, T, H, K), dim=-1), F.normalize(randn(B, T, H, K), dim=-1)
    v = randn(B, T, H, V)
    g = F.logsigmoid(randn(B, T, H) * gate[1] + gate[0])
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    lamb = 0.25 + torch.rand(H, K, generator=gen, dtype=torch.float64)
    a = randn(N, H, K, K)
    h0 = (a @ a.transpose(-1, -2) / K, randn(N, H, K, V))
    do = randn(B, T, H, V) * scale
    dht = (randn(N, H, K, K) * scale, randn(N, H, K, V) * scale)
    inputs = [t.to(DEV) for t in (q, k, v, g, beta, lamb)]
    return inputs, tuple(t.to(DEV) for t in h0), do.to(DEV), tuple(t.to(DEV) for t in dht)


def run(k, v, g, beta, h0, do, dht, x, e, h_kk, h_kv, cu, C, precision, io_dtype=torch.float32):
    f32 = dict(dtype=torch.float32)
    ci = None if cu is None else prepare_chunk_indices(cu, C)
    g_cum = g_cumsum(g, cu, C).float()
    k, v, do = (t.to(io_dtype) for t in (k, v, do))
    kw = dict(cu_seqlens=cu, chunk_indices=ci, chunk_size=C, precision=precision)
    dx = chunk_mesa_bwd_dx(do, k, v, g_cum, beta.float(), h_kv.float(), **kw)
    dk, dv, dg, db, dl, dh0 = chunk_mesa_bwd_grads(
        x.to(**f32), e.to(**f32), do, k, v, g_cum, beta.float(), h_kk.float(), h_kv.float(),
        initial_state=tuple(t.float() for t in h0), dht=tuple(t.float() for t in dht), **kw)
    return dict(dx=dx, dk=dk, dv=dv, dg=dg, dbeta=db, dlamb=dl, dh0_kk=dh0[0], dh0_kv=dh0[1])


def accuracy(label, B, T, H, K, V, cu, C, precision, scale, io_dtype=torch.float32, gate=(3.0, 1.0)):
    cu_t = None if cu is None else torch.tensor(cu, device=DEV)
    (q, k, v, g, beta, lamb), h0, do, dht = make(B, T, H, K, V, cu, scale, gate=gate)
    if io_dtype == torch.bfloat16:
        # the reference sees the bf16-rounded values the kernels see
        k, v, do = (t.to(torch.bfloat16).double() for t in (k, v, do))
    ref = {n: t.to(DEV) for n, t in reference(q, k, v, g, beta, lamb, h0, do, dht, cu_t, C).items()}
    out = run(k, v, g, beta, h0, do, dht, ref['x'], ref['e'], ref['h_kk'], ref['h_kv'], cu_t, C, precision, io_dtype)
    errs = {n: rel(out[n], ref[n]) for n in out}
    log(f"| {label} | {precision} | {str(io_dtype).split('.')[-1]} | {scale:g} | "
        + " | ".join(f"{errs[n]:.1e}" for n in ('dx',) + NAMES) + " |")
    return errs


def autotuner(name):
    from triton.runtime.autotuner import Autotuner
    obj = getattr(chunk_bwd, name)
    while not isinstance(obj, Autotuner):
        obj = obj.fn
    return obj


def guarded(fn, *args, **kwargs):
    # one failing case must not lose the others' numbers
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        log(f"FAILED {fn.__name__}{args}: {type(err).__name__}: {str(err)[:2000]}")


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def timing(B, T, H, D, C, precision, io_dtype):
    torch.manual_seed(0)
    k = F.normalize(torch.randn(B, T, H, D, device=DEV), dim=-1).to(io_dtype)
    v = torch.randn(B, T, H, D, device=DEV).to(io_dtype)
    do = torch.randn(B, T, H, D, device=DEV).to(io_dtype)
    x, e = torch.randn(B, T, H, D, device=DEV), torch.randn(B, T, H, D, device=DEV)
    g = F.logsigmoid(torch.randn(B, T, H, device=DEV) + 3)
    beta = torch.rand(B, T, H, device=DEV)
    NT = triton.cdiv(T, C)
    g_cum = (g.view(B, NT, C, H).cumsum(2) / math.log(2)).view(B, T, H).contiguous()
    h_kk = torch.randn(B, NT, H, D, D, device=DEV)
    h_kv = torch.randn(B, NT, H, D, D, device=DEV)
    kw = dict(chunk_size=C, precision=precision)
    t_dx = bench(lambda: chunk_mesa_bwd_dx(do, k, v, g_cum, beta, h_kv, **kw))
    t_dh = bench(lambda: chunk_mesa_bwd_dh(x, e, do, g_cum, **kw))
    t_gr = bench(lambda: chunk_mesa_bwd_grads(x, e, do, k, v, g_cum, beta, h_kk, h_kv, **kw))
    nch = B * NT * H
    fl_dx = nch * 2 * (2 * C * C * D + C * D * D)
    fl_dh = nch * 2 * (2 * C * D * D)
    fl_gk = nch * 2 * (7 * C * C * D + 5 * C * D * D + C ** 3)
    t_gk = t_gr - t_dh
    log(f"| {B}x{T} | {precision} | {str(io_dtype).split('.')[-1]} | {t_dx:.3f} ({fl_dx / t_dx / 1e9:.0f}) | "
        f"{t_dh:.3f} ({fl_dh / t_dh / 1e9:.0f}) | {t_gk:.3f} ({fl_gk / t_gk / 1e9:.0f}) | {t_dx + t_gr:.3f} |")


def speed():
    log()
    log("## Time (ms; in parentheses achieved TFLOP/s of the matmuls) at B·T = 16384, H = 16, K = V = 128, chunk 64")
    log("x, e, states fp32; k, v, do in the listed dtype. grads = chunk_mesa_bwd_grads without its dh kernel.")
    log()
    log("| B x T | precision | k/v/do | dx | dh (reverse states) | grads | dx + dh + grads |")
    log("|---|---|---|---|---|---|---|")
    t0 = time.time()
    for precision, io in (('tf32x3', torch.bfloat16), ('tf32x3', torch.float32), ('ieee', torch.float32)):
        guarded(timing, 4, 4096, 16, 128, 64, precision, io)
    for B, T in ((16, 1024), (1, 16384)):
        guarded(timing, B, T, 16, 128, 64, 'tf32x3', torch.bfloat16)
    log()
    log(f"(autotune + timing took {time.time() - t0:.0f} s)")
    for name in ('chunk_mesa_kernel_o', 'chunk_mesa_bwd_kernel_dh', 'chunk_mesa_bwd_kernel_grads'):
        kern = autotuner(name)
        log(f"{name} best configs: " + "; ".join(f"{key[:3]}: {cfg}" for key, cfg in getattr(kern, 'cache', {}).items()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default=None)
    parser.add_argument('--no-speed', action='store_true')
    args = parser.parse_args()
    global OUT_FILE
    OUT_FILE = args.out
    log("# Mesa chunk backward kernels")
    log(f"{header()}; default precision {chunk_bwd.BWD_DOT_PRECISION}")
    if not args.no_speed:
        speed()
    log()
    log("## Relative error against float64 (same x, e, chunk states; h0 and dht given)")
    log()
    log("| case | precision | k/v/do | scale | " + " | ".join(('dx',) + NAMES) + " |")
    log("|---" * 12 + "|")
    for precision in ('ieee', 'tf32x3'):
        for scale in (1.0, 1e-4, 1e-8):
            guarded(accuracy, 'B1 T300 H2 D128', 1, 300, 2, 128, 128, None, 64, precision, scale)
    guarded(accuracy, 'B1 T300 H2 D128', 1, 300, 2, 128, 128, None, 64, 'tf32x3', 1.0, torch.bfloat16)
    guarded(accuracy, 'B1 T300 H2 D128 gates~1', 1, 300, 2, 128, 128, None, 64, 'tf32x3', 1e-8, gate=(9.0, 0.5))
    # odd shapes: one config per kernel (compile time), masks and varlen on the GPU
    for name in ('chunk_mesa_kernel_o', 'chunk_mesa_bwd_kernel_dh', 'chunk_mesa_bwd_kernel_grads'):
        kern = autotuner(name)
        kern.configs = kern.configs[:1]
    guarded(accuracy, 'varlen [0,1,70,134,150] K48 V40', 1, 150, 2, 48, 40, [0, 1, 70, 134, 150], 64, 'tf32x3', 1e-4)
    guarded(accuracy, 'B2 T63 K20 V24 C16 strong decay', 2, 63, 1, 20, 24, None, 16, 'ieee', 1.0, gate=(-1.0, 2.0))


if __name__ == '__main__':
    main()
