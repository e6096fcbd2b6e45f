# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
fla-mesa's chunk_mesa beside fla's chunk_mesa_net, GLA, gated delta rule and torch sdpa (issue 3), on one GPU.

Speed at B·T = --tokens (16384), H = 16, D = 128, bf16 q/k/v, fp32 g/beta/lamb, inputs as in
shared docs' baseline-h100.md (q, k L2-normalised; g = logsigmoid(N(0,1) + 4); beta = sigmoid(U(0,1));
lamb = softplus(U(0,1)) + 0.25): forward and forward+backward milliseconds (triton.testing.do_bench medians), peak
memory of forward+backward above the inputs, and the achieved TFLOP/s of the CG kernel alone (CG matvec FLOPs
actually executed: per (chunk of 64, head) and step 2·(2·64²·K + 64·K²), i.e. 17.2 GFLOP per step here, divided by
the CG kernel's time, readout included). Then accuracy at a smaller shape (B=1, T=256, H=4, D=128) against a
float64 exact solve of the same bf16-rounded inputs: relative error of o and of every gradient, at upstream-gradient
scales 1, 1e-5 and 1e-8. A row that fails prints 'n/a' and the reason.

    python benchmarks/benchmark_chunk.py                      # the full table (issue 3)
    python benchmarks/benchmark_chunk.py --Ts 1024 8192       # fewer lengths
    python benchmarks/warm_cache.py                           # first: compiles every kernel config in parallel
    python benchmarks/benchmark_chunk.py --study              # forward kernels only: checks against float64,
                                                              # the solver operand-precision study, fwd timings
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

# the repository root: the GPU config lists and pinning are the tests' (tests/gpu_configs.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.gpu_configs import pin, pin_all, slice_configs  # noqa: E402

GRADS = ['dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb']
# 'cpu' (with TRITON_INTERPRET=1 and tiny --tokens) only to smoke-test this script
DEVICE = 'cuda'
# --pin-config, --config-slice (warm_cache.py): run every op once to compile its kernels, time nothing
COMPILE_ONLY = False


def sync():
    if DEVICE == 'cuda':
        torch.cuda.synchronize()


def header():
    import triton
    try:
        import fla
        fla_version = getattr(fla, '__version__', '?')
    except ImportError:
        fla_version = 'not installed'
    # COMMIT=...: where the files were copied to the GPU machine without their git history
    commit = os.environ.get('COMMIT')
    try:
        commit = commit or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or 'unknown'
    except Exception:
        commit = 'unknown'
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    return (f"{gpu}; torch {torch.__version__}, triton {triton.__version__}, fla {fla_version}, "
            f"fla-mesa commit {commit}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def log(*a):
    print(*a, flush=True)


def make_inputs(B, T, H, D, device=None, gate_mu=4.0, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + gate_mu)
    beta = torch.rand(B, T, H, generator=gen).sigmoid()
    lamb = F.softplus(torch.rand(H, D, generator=gen)) + 0.25
    return [x.to(device or DEVICE) for x in (q, k, v, g, beta, lamb)]


# ---------------------------------------------------------------------------------------------------------------
# the ops: each maps (q, k, v, g, beta, lamb) to o


@contextlib.contextmanager
def row_precision(name):
    """
    A row named '..., bf16 CG' runs (forward and backward) with the CG kernel's products in single bf16; one named
    '..., plain p' with unrounded CG directions (`chunk_cg.CG_ROUND_DIRECTIONS = False`; rounded is the default).
    """
    from fla_mesa.ops.mesa import chunk_cg
    setting = {'bf16 CG': ('CG_DOT_PRECISION', 'bf16'), 'plain p': ('CG_ROUND_DIRECTIONS', False)}
    attr, value = next((v for suffix, v in setting.items() if name.endswith(suffix)), (None, None))
    if attr is None:
        yield
        return
    saved = getattr(chunk_cg, attr)
    setattr(chunk_cg, attr, value)
    try:
        yield
    finally:
        setattr(chunk_cg, attr, saved)


def op_table(only=None):
    ops = {}
    try:
        from fla_mesa.ops.mesa import chunk_mesa
        # as MesaNet calls it: no host sync to check the values of Λ and g (fla's op checks none either)
        for name, tol in (('30 steps', None), ('tol 1e-4', 1e-4)):
            ops[f'fla-mesa {name}'] = (lambda tol: lambda q, k, v, g, b, l: chunk_mesa(
                q, k, v, g, b, l, cg_max_steps=30, cg_tol=tol, check_values=False)[0])(tol)
        # the trade-off row: single bf16 products in the CG and readout (chunk_cg.CG_DOT_PRECISION = 'bf16'), fla's count
        ops['fla-mesa 30 steps, bf16 CG'] = ops['fla-mesa 30 steps']
        # rounded CG directions: 5 products a step instead of 7, the same accuracy (op README)
        ops['fla-mesa 30 steps, plain p'] = ops['fla-mesa 30 steps']
        ops['fla-mesa tol 1e-4, plain p'] = ops['fla-mesa tol 1e-4']
        # the default precondition='auto' against Jacobi alone: what its stall score and second pass cost
        ops['fla-mesa tol 1e-4, jacobi'] = lambda q, k, v, g, b, l: chunk_mesa(
            q, k, v, g, b, l, cg_max_steps=30, cg_tol=1e-4, precondition=True, check_values=False)[0]
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        ops['fla-mesa 30 steps'] = ops['fla-mesa tol 1e-4'] = reason
    try:
        from fla.ops.mesa_net import chunk_mesa_net
        for n in (10, 30):
            ops[f'fla mesa_net {n} steps'] = (
                lambda n: lambda q, k, v, g, b, l: chunk_mesa_net(q, k, v, g, b, l, max_CG_iteration=n)[0])(n)
    except Exception as e:
        ops['fla mesa_net 10 steps'] = ops['fla mesa_net 30 steps'] = f"{type(e).__name__}: {e}"
    try:
        from fla.ops.gla import chunk_gla
        ops['fla GLA'] = lambda q, k, v, g, b, l: chunk_gla(
            q, k, v, g[..., None].expand(*q.shape).contiguous(), scale=q.shape[-1] ** -0.5)[0]
    except Exception as e:
        ops['fla GLA'] = f"{type(e).__name__}: {e}"
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        ops['fla gated delta rule'] = lambda q, k, v, g, b, l: chunk_gated_delta_rule(q, k, v, g, b)[0]
    except Exception as e:
        ops['fla gated delta rule'] = f"{type(e).__name__}: {e}"
    ops['torch sdpa causal'] = lambda q, k, v, g, b, l: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    # --ops: the rows whose name contains one of the given strings
    return {n: f for n, f in ops.items() if not only or any(s in n for s in only)}


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"


def bench(fn):
    import triton
    if COMPILE_ONLY:
        fn()
        return float('nan')
    if DEVICE != 'cuda':
        fn()
        t0 = time.time()
        fn()
        return (time.time() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')


def cg_flops_per_step(B, T, H, K, chunk=64):
    NT = -(-T // chunk)
    return B * H * NT * 2 * (2 * chunk * chunk * K + chunk * K * K)


# ---------------------------------------------------------------------------------------------------------------
# the CG kernel alone (for TFLOP/s)


def ours_prepare(q, k, v, g, beta, lamb, chunk=64, **kw):
    from fla.ops.utils import chunk_local_cumsum

    from fla_mesa.ops.mesa.chunk_h import chunk_mesa_fwd_states
    from fla_mesa.ops.mesa.kernel_utils import RCP_LN2
    g_cum = chunk_local_cumsum(g.float(), chunk, scale=RCP_LN2)
    h_kk, h_kv, _ = chunk_mesa_fwd_states(k, v, g_cum, beta.float(), chunk_size=chunk, precision=kw.get('state_precision'))
    return g_cum, h_kk, h_kv


def ours_fwd(q, k, v, g, beta, lamb, steps, tol, precondition=True, chunk=64, **kw):
    """The forward kernels alone (cumsum, states, CG, readout): what chunk_mesa's forward runs."""
    from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
    g_cum, h_kk, h_kv = ours_prepare(q, k, v, g, beta, lamb, chunk, **kw)
    x, n, o = chunk_mesa_cg(q, k, g_cum, beta.float(), lamb.float(), h_kk, steps, tol, precondition, chunk_size=chunk,
                            v=v, h_kv=h_kv, precision=kw.get('precision'), readout_precision=kw.get('readout_precision'))
    return o, x, n


def ours_cg_time(q, k, v, g, beta, lamb, steps, tol, precondition=True, chunk=64, **kw):
    """(ms of the CG kernel with readout, executed CG steps per (chunk, head) tile on average)."""
    from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_cg
    g_cum, h_kk, h_kv = ours_prepare(q, k, v, g, beta, lamb, chunk, **kw)
    beta, lamb = beta.float(), lamb.float()

    def run():
        return chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, steps, tol, precondition, chunk_size=chunk, v=v,
                             h_kv=h_kv, precision=kw.get('precision'), readout_precision=kw.get('readout_precision'))
    _, n, _ = run()
    B, T, H = n.shape
    NT = -(-T // chunk)
    n = F.pad(n, (0, 0, 0, NT * chunk - T)).view(B, NT, chunk, H)
    tile_steps = n.amax(2).float().mean().item()
    return bench(run), tile_steps, n.float().mean().item()


def fla_cg_time(q, k, v, g, beta, lamb, steps, chunk=64):
    from fla.ops.mesa_net.chunk_cg_solver_fwd import chunk_mesa_cg_fwd
    # fla's own state pass (fla-mesa's is `chunk_mesa_fwd_states`)
    from fla.ops.mesa_net.chunk_h_fwd import chunk_mesa_fwd_h
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2
    q16, k16 = q.half(), k.half()
    g_cum = chunk_local_cumsum(g, chunk, scale=RCP_LN2)
    h, h_kv, _, _ = chunk_mesa_fwd_h(k=k16, v=v, g=g_cum, beta=beta, h_init=None, h_kv_init=None,
                                      output_final_state=False, states_in_fp32=False, chunk_size=chunk)
    return bench(lambda: chunk_mesa_cg_fwd(q=q16, k=k16, h=h, h_kv=h_kv, v=v, g_local_cumsum=g_cum, beta=beta,
                                           lamb=lamb, chunk_size=chunk, max_CG_iteration=steps))


# ---------------------------------------------------------------------------------------------------------------
# speed table


def speed_row(T, B, H, D, name, fn, inputs, do):
    """One row of the speed table: forward, forward+backward, peak memory, the CG kernel alone."""
    cells = []
    try:
        with torch.no_grad():
            fn(*inputs)
            cells.append(f"{bench(lambda: fn(*inputs)):.2f}")
    except Exception as e:
        cells.append(f"n/a: {short(e)}")
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    try:
        def fwd_bwd():
            fn(*leaves).backward(do)
        fwd_bwd()
        ms = bench(fwd_bwd)
        # no allocator statistics off the GPU (the CPU smoke test)
        peak = float('nan')
        if DEVICE == 'cuda':
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            sync()
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        cells += [f"{ms:.2f}", f"{peak:.2f}"]
    except Exception as e:
        cells += [f"n/a: {short(e)}", ""]
    del leaves
    cg = ['', '', '']
    try:
        flops = cg_flops_per_step(B, T, H, D)
        if name.startswith('fla-mesa'):
            tol = None if '30 steps' in name else 1e-4
            ms, tile_steps, tok_steps = ours_cg_time(*inputs, 30, tol)
            cg = [f"{ms:.2f}", f"{flops * tile_steps / ms / 1e9:.0f}", f"{tok_steps:.2f} / {tile_steps:.2f}"]
        elif name.startswith('fla mesa_net'):
            n = int(name.split()[2])
            ms = fla_cg_time(*inputs, n)
            cg = [f"{ms:.2f}", f"{flops * n / ms / 1e9:.0f}", f"{n} / {n}"]
    except Exception as e:
        cg = [f"n/a: {short(e)}", '', '']
    log(f"| {T} | {name} | " + " | ".join(cells + cg) + " |")


def speed_table(args):
    ops = op_table(args.ops)
    H, D = args.H, args.D
    log(f"\n## Speed: B·T = {args.tokens}, H = {H}, D = {D}, bf16 q/k/v, fp32 g/beta/lamb (ms, do_bench median)\n")
    log("| T | op | fwd ms | fwd+bwd ms | peak mem fwd+bwd GB | CG kernel ms | CG TFLOP/s | mean steps (token / tile) |")
    log("|---|---|---|---|---|---|---|---|")
    for T in args.Ts:
        B = max(args.tokens // T, 1)
        inputs = make_inputs(B, T, H, D)
        do = torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16)
        for name, fn in ops.items():
            if isinstance(fn, str):
                log(f"| {T} | {name} | n/a: {fn[:90]} | | | | | |")
                continue
            with row_precision(name):
                speed_row(T, B, H, D, name, fn, inputs, do)
        del inputs
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# accuracy table


def rel(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    if not torch.isfinite(x).all():
        return float('nan')
    return ((x - ref).norm() / ref.norm()).item()


def grads_of(fn, inputs, do):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o = fn(*leaves)
    (o.double() * do.to(o.device, torch.float64)).sum().backward()
    return [o.detach()] + [x.grad for x in leaves]


def accuracy_table(args):
    from fla_mesa.ops.mesa import naive_exact_mesa
    ops = op_table(args.ops)
    B, T, H, D = 1, args.acc_T, 4, args.D
    log(f"\n## Accuracy: B={B}, T={T}, H={H}, D={D}, bf16 q/k/v; relative error against a float64 exact solve of the "
        "same inputs; 'scale' is the std of the upstream gradient do\n")
    log("| gates | op | scale | o | " + " | ".join(GRADS) + " |")
    log("|---|---|---|---|" + "---|" * len(GRADS))
    for gate_mu, gate_name in ((4.0, 'γ≈0.98'), (8.0, 'γ≈0.9997')):
        inputs = make_inputs(B, T, H, D, gate_mu=gate_mu, seed=1)
        cpu64 = [x.double().cpu() for x in inputs]

        def exact(*x):
            return naive_exact_mesa(*x)[0]
        for scale in args.scales:
            gen = torch.Generator().manual_seed(2)
            do = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) * scale
            ref = grads_of(exact, cpu64, do)
            # what any bf16-in/bf16-out op must lose: do, o, dq, dk, dv rounded to bf16
            floor = grads_of(exact, cpu64, do.bfloat16().double())
            floor = [f.to(t.dtype).double() for f, t in zip(floor, [inputs[2]] + inputs)]
            log(f"| {gate_name} | bf16 rounding floor | {scale:g} | " + " | ".join(
                f"{rel(a, b):.1e}" for a, b in zip(floor, ref)) + " |")
            for name, fn in ops.items():
                if name in ('fla GLA', 'fla gated delta rule', 'torch sdpa causal'):
                    continue
                if isinstance(fn, str):
                    log(f"| {gate_name} | {name} | {scale:g} | n/a: {fn[:90]} |")
                    continue
                try:
                    with row_precision(name):
                        out = grads_of(fn, inputs, do)
                    log(f"| {gate_name} | {name} | {scale:g} | " + " | ".join(
                        f"{rel(a, b):.1e}" for a, b in zip(out, ref)) + " |")
                except Exception as e:
                    try:
                        with torch.no_grad():
                            o = fn(*inputs)
                        log(f"| {gate_name} | {name} | {scale:g} | {rel(o, ref[0]):.1e} | n/a (backward): {short(e)} |")
                    except Exception as e2:
                        log(f"| {gate_name} | {name} | {scale:g} | n/a: {short(e2)} |")


# ---------------------------------------------------------------------------------------------------------------
# --study: the forward kernels alone


def study(args):
    from fla.ops.utils import chunk_local_cumsum, prepare_chunk_indices

    from fla_mesa.ops.mesa import naive_exact_mesa
    from fla_mesa.ops.mesa.chunk_cg import CG_DOT_PRECISION, chunk_mesa_cg
    from fla_mesa.ops.mesa.chunk_h import STATE_DOT_PRECISION, chunk_mesa_fwd_states
    from fla_mesa.ops.mesa.kernel_utils import DOT_PRECISIONS, RCP_LN2
    log(f"defaults: CG precision {CG_DOT_PRECISION}, state/readout precision {STATE_DOT_PRECISION}")

    # 1. the kernels against float64 on assorted shapes (fp32 inputs: what the kernels add, not bf16 rounding)
    log("\n## Forward kernels vs float64 exact (fp32 inputs, 60 steps, cg_tol=None)\n")
    log("| shape | h_kk | h_kv | final | o | mean steps | ms |")
    log("|---|---|---|---|---|---|---|")
    import triton

    from fla_mesa.ops.mesa.chunk_cg import chunk_mesa_fwd_kernel_cg
    from fla_mesa.ops.mesa.chunk_h import chunk_mesa_fwd_kernel_h
    # one config each: these checks are about correctness, and every autotuning config would compile
    restore = [pin(chunk_mesa_fwd_kernel_cg, triton.Config({'NR': 2}, num_warps=4, num_stages=1)),
               pin(chunk_mesa_fwd_kernel_h, triton.Config({'BK': 64, 'BW': 64}, num_warps=4, num_stages=2))]
    cases = [(2, 63, 2, 128, 128, None), (1, 130, 2, 64, 128, None), (1, 200, 2, 128, 64, [0, 7, 100, 200]),
             (3, 100, 1, 16, 16, None), (1, 130, 1, 256, 256, None), (1, 65, 1, 200, 48, None)]
    for B, T, H, K, V, cu in cases:
        name = f"B{B} T{T} H{H} K{K} V{V}" + (f" varlen {cu}" if cu else "")
        try:
            q, k, v, g, beta, lamb = make_inputs(B, T, H, K, seed=3, dtype=torch.float32)
            v = torch.randn(B, T, H, V, device=DEVICE)
            N = B if cu is None else len(cu) - 1
            a = torch.randn(N, H, K, K, device=DEVICE)
            h0 = (a @ a.transpose(-1, -2) / K, torch.randn(N, H, K, V, device=DEVICE))
            cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
            ci = None if cu is None else prepare_chunk_indices(cu_t, 64)
            t0 = time.time()
            g_cum = chunk_local_cumsum(g, 64, scale=RCP_LN2, cu_seqlens=cu_t, chunk_indices=ci)
            h_kk, h_kv, fin = chunk_mesa_fwd_states(k, v, g_cum, beta, h0, True, cu_seqlens=cu_t, chunk_indices=ci)
            x, n, o = chunk_mesa_cg(q, k, g_cum, beta, lamb, h_kk, 60, None, True, cu_seqlens=cu_t,
                                    chunk_indices=ci, v=v, h_kv=h_kv)
            sync()
            ms = (time.time() - t0) * 1e3
            c64 = [t.double().cpu() for t in (q, k, v, g, beta, lamb)]
            r_o, r_fin = naive_exact_mesa(*c64, tuple(h.double().cpu() for h in h0), True, cu_seqlens=None if cu is None
                                          else torch.tensor(cu))
            # chunk-start states from the reference: rerun the exact recurrence to every chunk start
            errs_h = []
            for hh, idx in ((h_kk, 0), (h_kv, 1)):
                # the last chunk-start state of sequence 0 against a reference run up to that token
                nt0 = -(-(T if cu is None else cu[1]) // 64)
                t_start = (nt0 - 1) * 64
                if t_start == 0:
                    ref_h = h0[idx][0].double().cpu()
                else:
                    _, rf = naive_exact_mesa(*(t[:1, :t_start] for t in c64[:5]), c64[5],
                                             tuple(h[:1].double().cpu() for h in h0), True)
                    ref_h = rf[idx][0]
                errs_h.append(rel(hh[0, nt0 - 1], ref_h))
            log(f"| {name} | {errs_h[0]:.1e} | {errs_h[1]:.1e} | {max(rel(fin[0], r_fin[0]), rel(fin[1], r_fin[1])):.1e} "
                f"| {rel(o, r_o):.1e} | {n.float().mean().item():.1f} | {ms:.0f} (incl. compile) |")
        except Exception as e:
            log(f"| {name} | n/a: {short(e)} |")
            traceback.print_exc(limit=3)
    for r in restore:
        r()

    # 2. operand precision of the CG loop: accuracy (small shape, bf16 inputs) and speed (benchmark shape)
    precisions = [p for p in args.precisions if p in DOT_PRECISIONS]
    log("\n## Solver operand precision: accuracy (B=1 T=256 H=4 D=128, bf16 q/k/v, vs float64 exact of the same "
        f"inputs) and CG kernel time (B·T={args.tokens}, T={args.study_T}, H=16, D=128; readout included)\n")
    log("| CG precision | gates | o err 30 steps | o err tol 1e-4 | x err tol 1e-6 (cap 60) | mean steps tol 1e-4 "
        "| CG ms 30 steps | TFLOP/s | CG ms tol 1e-4 | tile steps tol 1e-4 |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    acc_inputs = {mu: make_inputs(1, 256, 4, 128, gate_mu=mu, seed=1) for mu in (4.0, 8.0)}
    refs = {}
    for mu, inp in acc_inputs.items():
        c64 = [t.double().cpu() for t in inp]
        refs[mu] = naive_exact_mesa(*c64)[0]
    Tb = args.study_T
    Bb = max(args.tokens // Tb, 1)
    big = make_inputs(Bb, Tb, 16, 128)
    flops = cg_flops_per_step(Bb, Tb, 16, 128)
    for prec in precisions:
        for mu, gname in ((4.0, 'γ≈0.98'), (8.0, 'γ≈0.9997')):
            row = [prec, gname]
            try:
                inp = acc_inputs[mu]
                o30 = ours_fwd(*inp, 30, None, precision=prec)[0]
                o4, _, n4 = ours_fwd(*inp, 30, 1e-4, precision=prec)
                o6 = ours_fwd(*inp, 60, 1e-6, precision=prec)[0]
                row += [f"{rel(o30, refs[mu]):.2e}", f"{rel(o4, refs[mu]):.2e}", f"{rel(o6, refs[mu]):.2e}",
                        f"{n4.float().mean().item():.2f}"]
                if mu == 4.0:
                    ms30, tile30, _ = ours_cg_time(*big, 30, None, precision=prec)
                    ms4, tile4, _ = ours_cg_time(*big, 30, 1e-4, precision=prec)
                    row += [f"{ms30:.3f}", f"{flops * tile30 / ms30 / 1e9:.0f}", f"{ms4:.3f}", f"{tile4:.2f}"]
            except Exception as e:
                row.append(f"n/a: {short(e)}")
                traceback.print_exc(limit=3)
            log("| " + " | ".join(row) + " |")
    try:
        ms = fla_cg_time(*big, 30)
        log(f"| fla chunk_mesa_net (fp16 operands, fp16 H) | | | | | | {ms:.3f} | {flops * 30 / ms / 1e9:.0f} | | |")
    except Exception as e:
        log(f"| fla chunk_mesa_net | n/a: {short(e)} |")

    # 3. state precision: error of the last chunk-start state and time of chunk_mesa_fwd_states
    log("\n## State kernel precision (h_kk, h_kv at the benchmark shape; error vs float64 at B=1 T=256 H=4 D=128)\n")
    log("| state precision | h_kk err | h_kv err | o err (30 steps) | fwd_h ms |")
    log("|---|---|---|---|---|")
    for prec in [p for p in ('ieee', 'tf32x3', 'tf32', 'bf16x3', 'bf16') if p in precisions]:
        try:
            inp = acc_inputs[8.0]
            c64 = [t.double().cpu() for t in inp]
            g_cum = chunk_local_cumsum(inp[3], 64, scale=RCP_LN2)
            h_kk, h_kv, fin = chunk_mesa_fwd_states(inp[1], inp[2], g_cum, inp[4], None, True, precision=prec)
            _, rf = naive_exact_mesa(*c64, None, True)
            o30 = ours_fwd(*inp, 30, None, state_precision=prec, readout_precision=prec)[0]
            g_big = chunk_local_cumsum(big[3], 64, scale=RCP_LN2)
            ms = bench(lambda: chunk_mesa_fwd_states(big[1], big[2], g_big, big[4], precision=prec))
            log(f"| {prec} | {rel(fin[0], rf[0]):.1e} | {rel(fin[1], rf[1]):.1e} | {rel(o30, refs[8.0]):.2e} | {ms:.3f} |")
        except Exception as e:
            log(f"| {prec} | n/a: {short(e)} |")

    # 4. forward timings beside fla's chunk_mesa_net at the benchmark shape (our forward kernels alone: cumsum,
    # states, CG, readout; the public chunk_mesa adds validation)
    log(f"\n## Forward ms (B·T={args.tokens}, H=16, D=128, bf16), our forward kernels vs fla chunk_mesa_net\n")
    log("| T | ours 30 steps | ours tol 1e-4 | ours mean steps | fla 10 steps | fla 30 steps |")
    log("|---|---|---|---|---|---|")
    from fla.ops.mesa_net import chunk_mesa_net
    for T in args.Ts:
        B = max(args.tokens // T, 1)
        inp = make_inputs(B, T, 16, 128)
        row = [str(T)]
        for steps, tol in ((30, None), (30, 1e-4)):
            try:
                row.append(f"{bench(lambda: ours_fwd(*inp, steps, tol)):.3f}")
            except Exception as e:
                row.append(f"n/a: {short(e)}")
        try:
            row.append(f"{ours_fwd(*inp, 30, 1e-4)[2].float().mean().item():.2f}")
        except Exception:
            row.append('n/a')
        for n in (10, 30):
            try:
                row.append(f"{bench(lambda: chunk_mesa_net(*inp, max_CG_iteration=n)):.3f}")
            except Exception as e:
                row.append(f"n/a: {short(e)}")
        log("| " + " | ".join(row) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--Ts', type=int, nargs='+', default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument('--tokens', type=int, default=16384)
    p.add_argument('--H', type=int, default=16)
    p.add_argument('--D', type=int, default=128)
    p.add_argument('--acc-T', type=int, default=256)
    p.add_argument('--scales', type=float, nargs='+', default=[1, 1e-5, 1e-8])
    p.add_argument('--ops', nargs='+', default=None, help="only the rows whose name contains one of these, e.g. mesa")
    p.add_argument('--no-speed', action='store_true')
    p.add_argument('--no-accuracy', action='store_true')
    p.add_argument('--study', action='store_true', help='forward kernels only: checks, precision study, fwd timings')
    p.add_argument('--study-T', type=int, default=4096)
    p.add_argument('--precisions', nargs='+', default=['ieee', 'tf32x3', 'tf32', 'bf16x3', 'bf16'])
    p.add_argument('--pin-config', type=int, default=None, metavar='I',
                   help="compile only (warm_cache.py): every fla-mesa chunk kernel pinned to its config I (mod its "
                        "count), every op run once, nothing timed")
    p.add_argument('--config-slice', type=int, nargs=2, default=None, metavar=('I', 'N'),
                   help="compile only (warm_cache.py): every autotuned kernel of fla and fla-mesa cut to its configs "
                        "I, I + N, ..., every op run once, nothing timed")
    p.add_argument('--device', default='cuda', help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEVICE, COMPILE_ONLY
    DEVICE = args.device
    if args.pin_config is not None:
        COMPILE_ONLY = True
        pin_all(args.pin_config)
    if args.config_slice is not None:
        COMPILE_ONLY = True
        slice_configs(*args.config_slice)
    if DEVICE == 'cuda' and not torch.cuda.is_available():
        sys.exit("benchmark_chunk.py needs a CUDA GPU")
    if DEVICE != 'cuda':
        from tests.interpret import interpret_compat
        interpret_compat()
    log("# " + header())
    if args.study:
        study(args)
        return
    if not args.no_speed:
        speed_table(args)
    if not args.no_accuracy:
        accuracy_table(args)


if __name__ == '__main__':
    main()
