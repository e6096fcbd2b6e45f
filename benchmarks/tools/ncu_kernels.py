# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Where a chunk kernel's time goes inside it, from Nsight Compute's instruction-level samples. `--run` is the workload:
the op's forward and backward (bf16, cg_tol 1e-4, 'auto', `benchmark_chunk.py`'s inputs) at the small model's shape,
every chunk kernel pinned to one config (no autotuning under the profiler; by default the H200's winners). `--split`
reads the report's SASS page and splits each kernel's instructions by how often they ran: once a warp (a program's
set-up and end) or more (its loops, one row per loop body), with each part's share of the samples, its stall reasons
and its opcodes.

    python benchmarks/tools/ncu_kernels.py --run          # compiles, outside the profiler
    ncu --clock-control none -k 'regex:chunk_mesa_(fwd_kernel_cg|bwd_kernel_cg|bwd_kernel_grads)' --launch-skip 5 \\
        --launch-count 5 --set full --import-source yes -o prof python benchmarks/tools/ncu_kernels.py --run
    ncu -i prof.ncu-rep --page source --csv --print-source sass > sass.csv
    python benchmarks/tools/ncu_kernels.py --split sass.csv
"""

import argparse
import collections
import csv
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the configs `--run` pins (indices into the autotune lists of `tests/gpu_configs.py`): the autotuner's picks on the
# H200 at this shape (benchmarks/results/solver_h200.md sections 12 and 15; the grads kernel's three-stage config since
# training_h200.md section 19)
WINNERS = {'cg': 0, 'cg_bwd': 0, 'grads': 6, 'states': 0, 'dh': 0, 'o': 0}


def run(shape, iters):
    import torch
    sys.path[:0] = [ROOT, os.path.join(ROOT, 'benchmarks')]
    from benchmark_chunk import make_inputs
    from tests.gpu_configs import gpu_configs, pin

    from fla_mesa.ops.mesa import chunk_mesa
    configs = gpu_configs()
    for name, index in WINNERS.items():
        pin(configs[name][0], configs[name][1][index])
    leaves = [x.requires_grad_() for x in make_inputs(*shape, 'cuda')]
    do = torch.randn_like(leaves[2])
    for _ in range(iters):
        chunk_mesa(*leaves, cg_max_steps=30, cg_tol=1e-4)[0].backward(do)
    torch.cuda.synchronize()


def kernels(path):
    """[(kernel name, header, rows)] of an `ncu --page source --csv --print-source sass` export, in its order."""
    out = []
    with open(path, newline='') as f:
        for row in csv.reader(f):
            if row[:1] == ['Kernel Name']:
                out.append((row[1], None, []))
            elif row[:1] == ['Address'] and out:
                out[-1] = (out[-1][0], row, out[-1][2])
            elif out and row and row[0].startswith('0x'):
                out[-1][2].append(row)
    return out


def opcode(sass):
    # '@!P0 FADD.FTZ R1, ...' -> 'FADD'
    return re.sub(r'^@!?U?P\w+\s+', '', sass.strip()).split(' ')[0].split('.')[0]


def split(path, top):
    print('| kernel | part | instructions | executed a warp | samples | stall reasons (share of the part) | opcodes '
          '(instructions, share of the part\'s samples) |\n|---|---|---|---|---|---|---|')
    seen = collections.Counter()
    for name, hdr, rows in kernels(path):
        # a kernel launched twice an iteration ('auto''s second pass) is told apart by its launch
        seen[name] += 1
        name = f'{name} ({seen[name]})'
        i_samples, i_exec = hdr.index('Warp Stall Sampling (All Samples)'), hdr.index('Instructions Executed')
        stalls = [(i, h[len('stall_'):]) for i, h in enumerate(hdr) if h.startswith('stall_') and '(' not in h]
        parts = collections.defaultdict(list)
        for row in rows:
            parts[int(row[i_exec])].append(row)
        # a warp runs its set-up once: the count the most instructions share (an empty pass runs little of its code)
        warps = max((e for e in parts if e > 0), key=lambda e: len(parts[e]), default=0)
        if warps == 0:
            continue
        total = sum(int(r[i_samples]) for r in rows) or 1
        for executed, part in sorted(parts.items(), key=lambda p: -sum(int(r[i_samples]) for r in p[1])):
            samples = sum(int(r[i_samples]) for r in part)
            if samples < 0.01 * total or executed == 0:
                continue
            reasons = collections.Counter({s: sum(int(r[i]) for r in part) for i, s in stalls})
            ops, op_samples = collections.Counter(), collections.Counter()
            for r in part:
                ops[opcode(r[1])] += 1
                op_samples[opcode(r[1])] += int(r[i_samples])
            label = 'once a warp' if executed == warps else f'x{executed / warps:.2f} a warp'
            print(f"| {name} | {label} | {len(part)} | {executed / warps:.2f} | {100 * samples / total:.1f}% | "
                  + ', '.join(f'{s} {100 * n / samples:.0f}%' for s, n in reasons.most_common(top)) + ' | '
                  + ', '.join(f'{o} ({ops[o]}, {100 * n / samples:.0f}%)' for o, n in op_samples.most_common(top))
                  + ' |')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument('--run', action='store_true', help='the workload (to run under ncu)')
    g.add_argument('--split', metavar='CSV', help="the SASS page of ncu's report, as csv")
    p.add_argument('--shape', type=int, nargs=4, default=[8, 2048, 8, 128], metavar=('B', 'T', 'H', 'D'))
    p.add_argument('--iters', type=int, default=3)
    p.add_argument('--top', type=int, default=6, help='stall reasons and opcodes listed a part')
    a = p.parse_args()
    if a.run:
        run(a.shape, a.iters)
    else:
        split(a.split, a.top)


if __name__ == '__main__':
    main()
