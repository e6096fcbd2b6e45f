# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Compiles ahead, in parallel, the Triton kernels benchmark_chunk.py autotunes, so that its timed run spends its time
timing.

An autotuner compiles every config of its kernel at the first call, one after another in one process: at K = V = 128
that took most of a 330 s benchmark run on an H200 (benchmarks/results/chunk_h200.md), and fla's kernels carry 30-48
configs each. Here --jobs processes run every row once (fla-mesa's and fla's; `benchmark_chunk.py --config-slice I
N`), process I with every autotuned kernel of fla and fla-mesa cut to its configs I, I + N, ...; together they
compile every config, and the binaries land in Triton's cache (TRITON_CACHE_DIR) where the timed run finds them.
Autotuning choices are not cached here (TRITON_CACHE_AUTOTUNING=0): configs timed beside other processes would be
picked on noise.

    python benchmarks/warm_cache.py && python benchmarks/benchmark_chunk.py
    python benchmarks/warm_cache.py --jobs 8 -- --Ts 1024 8192        # arguments after -- go to benchmark_chunk.py
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

HERE = os.path.dirname(os.path.abspath(__file__))


def jobs(n, extra):
    script = [sys.executable, os.path.join(HERE, 'benchmark_chunk.py')]
    return [script + ['--config-slice', str(i), str(n)] + extra for i in range(n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--jobs', type=int, default=min(8, os.cpu_count() or 1), help='processes at a time')
    parser.add_argument('--timeout', type=int, default=400, help='seconds per process')
    parser.add_argument('extra', nargs=argparse.REMAINDER, help='-- then arguments for benchmark_chunk.py')
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ['--'] else args.extra
    # at least one process per config of fla-mesa's chunk kernels, so that each compiles one of theirs
    sys.path.insert(0, os.path.dirname(HERE))
    from tests.gpu_configs import gpu_configs
    n = max(args.jobs, max(len(configs) for _, configs in gpu_configs().values()))
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING='0')

    def launch(cmd):
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            status = 'ok' if p.returncode == 0 else f'exit {p.returncode}: ' + (p.stderr.strip().splitlines() or [''])[-1][:150]
        except subprocess.TimeoutExpired:
            status = 'timeout'
        return f"{time.time() - t0:6.0f} s  {status}  {' '.join(cmd[2:])}"

    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        # each line as its process ends: a run cut by a time limit still shows what finished
        for future in as_completed([pool.submit(launch, cmd) for cmd in jobs(n, extra)]):
            print(future.result(), flush=True)
    print(f"warm_cache: {time.time() - t0:.0f} s in all", flush=True)


if __name__ == '__main__':
    main()
