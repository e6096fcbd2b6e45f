# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The Mesa layer's input projections alone, forward and forward+backward (do_bench median ms), at the small model's
shape (16384 tokens, hidden 1024, 8 heads; bf16): q, k, v and the gates' a, b (and g) as separate projections with
autograd, against one GEMM whose output is split into column views (autograd's backward, which keeps the weights'
concatenation), the same made contiguous, and a Function whose backward sums the input gradient by a chain of addmm;
last column, the largest difference of x's and the weights' gradients from the separate projections', relative.
The library's `fla_mesa.modules.fused_linears` is the split-views row with a backward that keeps the weights
themselves (timed in the model: `benchmarks/benchmark_training.py`).

    python benchmarks/tools/projections_bench.py
    DEV=cpu python benchmarks/tools/projections_bench.py   # smoke run (no timing)
"""
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench as _do_bench

dev = os.environ.get('DEV', 'cuda')


def do_bench(fn, **kw):
    return _do_bench(fn, **kw) if dev == 'cuda' else 0.


torch.manual_seed(0)
N, D, H = (16384, 1024, 8) if dev == 'cuda' else (256, 128, 8)
dt = torch.bfloat16
x = torch.randn(N, D, device=dev, dtype=dt, requires_grad=True)
Ws = [(torch.randn(o, D, device=dev, dtype=dt) * 0.02).requires_grad_() for o in (D, D, D, H, H, D)]
bs = [torch.zeros(H, device=dev, dtype=dt, requires_grad=True) for _ in range(2)]
names = 'q k v a b g'.split()


def grads_for(n_out):
    return [torch.randn(N, w.shape[0], device=dev, dtype=dt) for w in Ws[:n_out]]


def sep(n_out):
    outs = []
    for i in range(n_out):
        b = bs[i - 3] if i in (3, 4) else None
        outs.append(F.linear(x, Ws[i], b))
    return outs


def cat(n_out, contig):
    W = torch.cat(Ws[:n_out])
    y = F.linear(x, W)
    outs = list(y.split([w.shape[0] for w in Ws[:n_out]], -1))
    outs[3] = outs[3] + bs[0]
    outs[4] = outs[4] + bs[1]
    if contig:
        outs = [o.contiguous() for o in outs]
    return outs


class MultiLinear(torch.autograd.Function):
    # forward: one GEMM, views out; backward: dX by a chain of addmm (accumulating in cuBLAS' epilogue), dW each
    @staticmethod
    def forward(ctx, x, *ws):
        ctx.save_for_backward(x, *ws)
        y = F.linear(x, torch.cat(ws))
        return tuple(y.split([w.shape[0] for w in ws], -1))

    @staticmethod
    def backward(ctx, *dys):
        x, *ws = ctx.saved_tensors
        dx = None
        big = [(dy, w) for dy, w in zip(dys, ws) if w.shape[0] >= 64]
        small = [(dy, w) for dy, w in zip(dys, ws) if w.shape[0] < 64]
        for dy, w in big:
            dx = dy @ w if dx is None else torch.addmm(dx, dy, w)
        if small:
            dx = torch.addmm(dx, torch.cat([d for d, _ in small], -1), torch.cat([w for _, w in small]))
        dws = [dy.t() @ x for dy in dys]
        return (dx, *dws)


def func(n_out):
    outs = list(MultiLinear.apply(x, *Ws[:n_out]))
    outs[3] = outs[3] + bs[0]
    outs[4] = outs[4] + bs[1]
    return outs


def step(fn, gs):
    outs = fn()
    torch.autograd.backward(outs, gs)
    x.grad = None
    for w in Ws + bs:
        w.grad = None


for n_out in (5, 6):
    gs = grads_for(n_out)
    ref = None
    for label, fn in [('separate', lambda: sep(n_out)), ('one GEMM, split views', lambda: cat(n_out, False)),
                      ('one GEMM, contiguous', lambda: cat(n_out, True)), ('Function, addmm chain', lambda: func(n_out))]:
        outs = fn()
        torch.autograd.backward(outs, gs)
        got = [x.grad] + [w.grad for w in Ws[:n_out]]
        if ref is None:
            ref = [g.float().clone() for g in got]
            err = 0.
        else:
            err = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
        x.grad = None
        for w in Ws + bs:
            w.grad = None
        f = do_bench(lambda: fn(), warmup=50, rep=300)
        fb = do_bench(lambda: step(fn, gs), warmup=50, rep=300)
        print(f'| {"+".join(names[:n_out])} | {label} | {f:.3f} | {fb:.3f} | {err:.1e} |', flush=True)
print(torch.__version__, file=sys.stderr)
