# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Every autotune config of every chunk kernel, one at a time, against float64: finds the configs a compiler gets wrong.

Triton 3.6 on Hopper miscompiled one config of the CG kernel (benchmarks/results/gpu_tests_h200.md): a fault at some
shapes, outputs 100% off without one at others. The autotuner runs every config at each new shape, so one bad
config crashes the process, or gives wrong answers if it wins the timing. Here `chunk_mesa` runs forward and
backward with one kernel pinned to one config (every other kernel to its first), each run in its own process (a
fault poisons the CUDA context), and one table gives, per config and shape, the largest relative error of o and
every gradient against float64 on the same rounded inputs, or FAULT. A cell over 3x its column's median is BAD.

    python benchmarks/check_configs.py                                   # GPU: bf16 and fp32, three (K, V)
    python benchmarks/check_configs.py --kernels grads --shapes 32x16 --dtypes bf16 --jobs 16
    python benchmarks/check_configs.py --dtypes bf16 --shapes 32x16 --sanitize   # a fault names its kernel

Under TRITON_INTERPRET=1 (CPU) the same runs check the kernels' logic in every GPU config, with no compiler in
the way, and every load and store against the kernel's tensors (tests/bounds.py).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
from benchmark_chunk import header, single_config  # noqa: E402
DTYPES = {'bf16': torch.bfloat16, 'fp32': torch.float32}


def kernels():
    """name -> (the kernel's autotuner, its GPU config list); the interpreter's own lists hold one config each."""
    from fla_mesa.ops.mesa import chunk_bwd, chunk_cg, chunk_h

    def gpu_list(module, fn):
        interpreting = module.is_interpreting
        module.is_interpreting = lambda: False
        try:
            return fn()
        finally:
            module.is_interpreting = interpreting

    def tuner(kernel):
        while not isinstance(kernel, triton.runtime.autotuner.Autotuner):
            kernel = kernel.fn
        return kernel

    return {
        'cg': (tuner(chunk_cg.chunk_mesa_cg_fwd_kernel), gpu_list(chunk_cg, chunk_cg._cg_configs)),
        'states': (tuner(chunk_h.chunk_mesa_fwd_kernel_h), gpu_list(chunk_h, chunk_h.state_configs)),
        'dh': (tuner(chunk_bwd.chunk_mesa_bwd_kernel_dh), gpu_list(chunk_h, chunk_h.state_configs)),
        'dx': (tuner(chunk_bwd.chunk_mesa_bwd_kernel_dx), gpu_list(chunk_bwd, chunk_bwd._configs)),
        'grads': (tuner(chunk_bwd.chunk_mesa_bwd_kernel_grads), gpu_list(chunk_bwd, chunk_bwd._grads_configs)),
    }


def describe(config):
    return ' '.join(f'{k}={v}' for k, v in config.kwargs.items()) + f' w{config.num_warps} s{config.num_stages}'


def run_case(kernel, index, dtype, K, V, T=130, device=None):
    """Relative errors of o and every gradient with `kernel` pinned to its config `index` (the rest to their first)."""
    from fla_mesa.ops.mesa import chunk_mesa
    from fla_mesa.utils import is_interpreting
    from tests.utils import make_inputs, rel_err

    device = device or ('cpu' if is_interpreting() else 'cuda')
    if is_interpreting():
        from tests import bounds
        bounds.install()
    for name, (tuner, configs) in kernels().items():
        single_config(tuner, configs[index] if name == kernel else configs[0])
    q, k, v, g, beta, lamb, h0 = make_inputs(1, T, 2, K, V, gate=(5.0, 1.0), initial_state=True, seed=K + V)
    q, k, v = (t.to(DTYPES[dtype]).double() for t in (q, k, v))
    do = torch.randn(1, T, 2, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    do = do.to(DTYPES[dtype]).double()
    # the dx kernel runs only without a solve (cg_max_steps = 0: q* = q)
    steps = 0 if kernel == 'dx' else 40

    def run(dev, qkv_dtype, dtype):
        leaves = [t.to(dev, qkv_dtype, copy=True).requires_grad_() for t in (q, k, v)]
        leaves += [t.to(dev, dtype, copy=True).requires_grad_() for t in (g, beta, lamb)]
        state = tuple(h.to(dev, dtype, copy=True).requires_grad_() for h in h0)
        o, _ = chunk_mesa(*leaves, initial_state=state, cg_max_steps=steps, cg_tol=None, check_values=False)
        (o * do.to(dev, o.dtype)).sum().backward()
        return [o] + [t.grad for t in leaves + list(state)]

    out = run(device, DTYPES[dtype], torch.float32)
    ref = run('cpu', torch.float64, torch.float64)
    names = ['o', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb', 'dh0_kk', 'dh0_kv']
    if steps == 0:
        names, out, ref = names[:6] + names[7:], out[:6] + out[7:], ref[:6] + ref[7:]
    return {n: rel_err(a, b) for n, a, b in zip(names, out, ref)}


def worker(args):
    try:
        errs = run_case(args.kernel, args.index, args.dtype, args.K, args.V)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        print('RESULT ' + json.dumps(errs), flush=True)
    except Exception as e:
        fault = 'illegal memory access' in str(e) or 'CUDA error' in str(e)
        print('RESULT ' + json.dumps({'error': ('FAULT: ' if fault else '') + f'{type(e).__name__}: {str(e)[:200]}'}))


def cell(result):
    if 'error' in result:
        return 'FAULT' if result['error'].startswith('FAULT') else 'ERROR'
    return max(result.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--kernels', nargs='+', default=None)
    parser.add_argument('--dtypes', nargs='+', default=['bf16', 'fp32'], choices=list(DTYPES))
    parser.add_argument('--shapes', nargs='+', default=['32x16', '64x32', '128x128'], help='KxV')
    parser.add_argument('--jobs', type=int, default=min(16, os.cpu_count() or 1), help='runs at a time')
    parser.add_argument('--timeout', type=int, default=300, help='seconds per run (compiling included)')
    parser.add_argument('--sanitize', action='store_true',
                        help='run each case under compute-sanitizer (memcheck): a FAULT cell names the faulting kernel')
    parser.add_argument('--out', default=None, help='also write the table here')
    parser.add_argument('--worker', nargs=5, metavar=('KERNEL', 'INDEX', 'DTYPE', 'K', 'V'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kernel, index, dtype, K, V = args.worker
        return worker(argparse.Namespace(kernel=kernel, index=int(index), dtype=dtype, K=int(K), V=int(V)))

    table = kernels()
    names = args.kernels or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown kernels {unknown}; choose from {list(table)}")
    columns = [(d, *map(int, s.split('x'))) for d in args.dtypes for s in args.shapes]
    rows = [(n, i, describe(c)) for n in names for i, c in enumerate(table[n][1])]

    def launch(job):
        (kernel, index, _), (dtype, K, V) = job
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', kernel, str(index), dtype, str(K), str(V)]
        if args.sanitize:
            cmd = ['compute-sanitizer', '--tool', 'memcheck', '--print-limit', '1'] + cmd
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {'error': 'TIMEOUT'}
        # the sanitizer's report names the kernel: '=========     at chunk_mesa_..._kernel+0x1a0 in file.py:84'
        culprit = re.search(r'^=+\s+at (\w+)\+0x[0-9a-f]+ in (\S+)', p.stdout + p.stderr, re.M)
        culprit = f' [{culprit.group(1)} at {culprit.group(2)}]' if culprit else ''
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith('RESULT ')]
        if not lines:
            # the process died before it could report
            fault = 'illegal memory access' in p.stderr or bool(culprit)
            return {'error': ('FAULT: ' if fault else '') + (p.stderr.strip().splitlines() or ['no output'])[-1][:200]
                    + culprit}
        result = json.loads(lines[-1][7:])
        if culprit:
            # the sanitizer saw a bad access, whether or not the run itself failed
            result = {'error': result['error'] + culprit if 'error' in result else 'FAULT: sanitizer' + culprit}
        return result

    def launch_and_report(job):
        # each result as it comes: a run cut short (a device call's time limit) still shows what finished
        result = launch(job)
        (kernel, _, config), (dtype, K, V) = job
        value = cell(result)
        print(f"{kernel} [{config}] {dtype} K{K} V{V}: " + (value if isinstance(value, str) else f"{value:.1e}"),
              flush=True)
        return result

    jobs = [(r, c) for r in rows for c in columns]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(launch_and_report, jobs)))

    lines = [f'# Every autotune config against float64 ({header()})', '',
             "Largest relative error of o and every gradient, bf16 or fp32 q/k/v (T = 130, H = 2, initial state, "
             "40 fixed steps; the dx kernel at 0 steps).", '',
             '| kernel | config | ' + ' | '.join(f'{d} K{K} V{V}' for d, K, V in columns) + ' |',
             '|---|---|' + '---|' * len(columns)]
    medians = {}
    for col in columns:
        values = [cell(results[(r, col)]) for r in rows]
        values = [v for v in values if isinstance(v, float)]
        medians[col] = statistics.median(values) if values else float('nan')
    bad = []
    for r in rows:
        cells = []
        for col in columns:
            v = cell(results[(r, col)])
            if isinstance(v, str) or v > 3 * medians[col]:
                bad.append(f'{r[0]} [{r[2]}] at {col[0]} K{col[1]} V{col[2]}: '
                           + (results[(r, col)].get('error', '')[:120] if isinstance(v, str) else f'{v:.1e}'))
            cells.append(v if isinstance(v, str) else f'{v:.1e}' + (' BAD' if v > 3 * medians[col] else ''))
        lines.append(f'| {r[0]} | {r[2]} | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Bad: ' + ('none' if not bad else ''), *[f'- {b}' for b in bad]]
    print('\n'.join(lines), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
