# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Every autotune config of every chunk kernel, one at a time, against float64: finds the configs a compiler gets wrong.

Triton 3.6 on Hopper miscompiled one config of the CG kernel (benchmarks/results/gpu_tests_h200.md): a fault at some
shapes, outputs 100% off without one at others. The autotuner runs every config at each new shape, so one bad
config crashes the process, or gives wrong answers if it wins the timing. Here `chunk_mesa` runs forward and
backward with one kernel pinned to one config (every other kernel to its first), each run in its own process (a
fault poisons the CUDA context), and one table gives, per config and shape, the largest relative error of o and
every gradient against float64 on the same rounded inputs, or FAULT. A cell over 3x its column's median is BAD.
The config lists, the pinning and the measurement are tests/gpu_configs.py's (the tests run them too).

    python benchmarks/tools/check_configs.py                                   # GPU: bf16 and fp32, three (K, V)
    python benchmarks/tools/check_configs.py --kernels grads --shapes 32x16 --dtypes bf16 --jobs 16
    python benchmarks/tools/check_configs.py --kernels grads --indices 2 5            # two configs of one kernel
    python benchmarks/tools/check_configs.py --dtypes bf16 --shapes 32x16 --sanitize   # a fault names its kernel

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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.dirname(HERE)]
from benchmark_chunk import header  # noqa: E402

from tests.gpu_configs import DTYPES, config_errors, describe, gpu_configs  # noqa: E402


def worker(args):
    try:
        errs = config_errors(args.kernel, args.index, args.dtype, args.K, args.V)
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
    parser.add_argument('--indices', type=int, nargs='+', default=None,
                        help="only these configs of each kernel's list (e.g. one just added)")
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

    table = gpu_configs()
    names = args.kernels or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown kernels {unknown}; choose from {list(table)}")
    columns = [(d, *map(int, s.split('x'))) for d in args.dtypes for s in args.shapes]
    rows = [(n, i, describe(c)) for n in names for i, c in enumerate(table[n][1])
            if args.indices is None or i in args.indices]

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
             "40 fixed steps; the output kernel at 0 steps, where it serves both the readout and dx).", '',
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
