# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The recurrent kernel's GPU cases that never finished on an H200 (benchmarks/results/gpu_tests_h200.md, section 5),
each alone in its own process with a time limit, one kernel config pinned at a time, with the kernel's fused
multiply-adds off (the kernel's default, `FP_FUSION`) and on: which of them hangs, and under which setting. Prints one
line per run as it ends, then a table: the relative error of o and the final states against the float64 exact
solve, or HANG (past --timeout) or the error.

    python benchmarks/tools/probe_recurrent.py --jobs 8 --timeout 60
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

# name -> (B, T, H, K, V, dtype, cg_max_steps, cg_tol, return_cg_steps), as in tests/ops/test_fused_recurrent.py
CASES = {
    'fp32 B2 T20 K16 V8 tol=None steps': (2, 20, 2, 16, 8, 'float32', 30, None, True),     # never finished
    'fp64 B2 T5 K16 V8 tol=None steps': (2, 5, 2, 16, 8, 'float64', 24, None, True),       # never finished
    'fp64 B1 T21 K16 V8 tol=None': (1, 21, 2, 16, 8, 'float64', 40, None, False),          # never finished
    'fp32 B1 T6 K16 V24 tol=None': (1, 6, 2, 16, 24, 'float32', 40, None, False),          # passed
    'fp32 B2 T20 K16 V8 tol=1e-6 steps': (2, 20, 2, 16, 8, 'float32', 30, 1e-6, True),
    'fp64 B2 T5 K16 V8 tol=1e-12 steps': (2, 5, 2, 16, 8, 'float64', 24, 1e-12, True),
}


def run_case(case, num_warps, fusion):
    import torch
    import triton

    from fla_mesa.ops.mesa import naive_exact_mesa
    from fla_mesa.ops.mesa import fused_recurrent
    from fla_mesa.ops.mesa.fused_recurrent import fused_recurrent_mesa, fused_recurrent_mesa_fwd_kernel
    from fla_mesa.utils import is_interpreting
    from tests.gpu_configs import pin
    from tests.utils import make_inputs, rel_err

    # under TRITON_INTERPRET=1 (CPU) only to smoke-test this script
    device = 'cpu' if is_interpreting() else 'cuda'
    B, T, H, K, V, dtype, steps, tol, store = CASES[case]
    fused_recurrent.FP_FUSION = fusion
    pin(fused_recurrent_mesa_fwd_kernel, triton.Config({'BV': 32}, num_warps=num_warps))
    inputs = make_inputs(B, T, H, K, V, dtype=torch.float64, initial_state=True)
    dtype = getattr(torch, dtype)
    args = [x.to(device, dtype) for x in inputs[:6]] + [tuple(h.to(device, dtype) for h in inputs[6])]
    out = fused_recurrent_mesa(*args, output_final_state=True, cg_max_steps=steps, cg_tol=tol, return_cg_steps=store)
    if device == 'cuda':
        torch.cuda.synchronize()
    ref, (r_kk, r_kv) = naive_exact_mesa(*inputs, output_final_state=True)
    o, (h_kk, h_kv) = out[:2]
    return {'o': rel_err(o, ref), 'h_kk': rel_err(h_kk, r_kk), 'h_kv': rel_err(h_kv, r_kv)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--jobs', type=int, default=8)
    parser.add_argument('--timeout', type=int, default=60, help='seconds per run, compiling included')
    parser.add_argument('--worker', nargs=3, metavar=('CASE', 'WARPS', 'FUSION'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print('RESULT ' + json.dumps(run_case(args.worker[0], int(args.worker[1]), args.worker[2] == '1')), flush=True)
        return

    def launch(job):
        case, warps, fusion = job
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', case, str(warps), fusion]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            result = 'HANG'
        else:
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith('RESULT ')]
            if lines:
                result = ' '.join(f'{k} {v:.1e}' for k, v in json.loads(lines[-1][7:]).items())
            else:
                result = 'ERROR ' + ((p.stderr.strip().splitlines() or ['no output'])[-1][:150])
        print(f'{case} | w{warps} | fp fusion {fusion}: {result}', flush=True)
        return result

    jobs = [(c, w, f) for c in CASES for w in (2, 4) for f in ('1', '0')]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(launch, jobs))
    print('\n| case | warps | fp fusion | result |\n|---|---|---|---|')
    for (case, warps, fusion), result in zip(jobs, results):
        print(f'| {case} | {warps} | {"on" if fusion == "1" else "off"} | {result} |')


if __name__ == '__main__':
    main()
