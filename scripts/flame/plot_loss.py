# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Loss curves and tokens/s from flame's training logs (run_gpu.sh's <name>.log): one PNG with every run, and per run
the mean tokens/s per GPU after warm-up and the largest loss gap to the first run over the first steps.

    python scripts/flame/plot_loss.py --out loss.png mesa-1gpu.log mesa-2gpu.log
"""

import argparse
import os
import re

STEP = re.compile(r'step:\s*(\d+)\s+loss:\s*([0-9.]+).*?tps:\s*([0-9,]+)')


def read_log(path: str):
    steps, losses, tps = [], [], []
    with open(path) as f:
        for line in f:
            m = STEP.search(re.sub(r'\x1b\[[0-9;]*m', '', line))
            if m:
                steps.append(int(m.group(1)))
                losses.append(float(m.group(2)))
                tps.append(float(m.group(3).replace(',', '')))
    if not steps:
        raise ValueError(f"no 'step: N loss: X ... tps: Y' lines in {path}")
    return steps, losses, tps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('logs', nargs='+')
    parser.add_argument('--out', required=True, help='PNG path')
    parser.add_argument('--skip', type=int, default=10, help='warm-up steps left out of tokens/s')
    parser.add_argument('--compare', type=int, default=50, help='steps over which the loss gap is taken')
    args = parser.parse_args()

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    runs = {os.path.basename(p).removesuffix('.log'): read_log(p) for p in args.logs}
    first = next(iter(runs.values()))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (steps, losses, tps) in runs.items():
        ax.plot(steps, losses, label=name, linewidth=1)
        # flame's tps is per GPU (tokens of one rank over its time)
        later = tps[args.skip:] or tps
        gap = [abs(a - b) for s, a, b in zip(steps, losses, first[1]) if s <= args.compare]
        print(f"{name}: steps {steps[0]}-{steps[-1]}, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
              f"(min {min(losses):.3f}), tokens/s per GPU {sum(later) / len(later):,.0f} after step {args.skip}, "
              f"max |loss - {next(iter(runs))}| over steps <= {args.compare}: {max(gap):.3f}")
    ax.set_xlabel('step')
    ax.set_ylabel('training loss')
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == '__main__':
    main()
