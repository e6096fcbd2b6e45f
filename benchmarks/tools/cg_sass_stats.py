# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The CG kernel compiled for sm_90 on any machine (no GPU needed: Triton's own ptxas and cuobjdump), counted: the
instructions of one CG step (the loop body, per warp), its tensor-core instructions (HMMA) and local-memory spills,
per autotune config, with rounded directions off and on (the kernel's `ROUND_P`). The benchmark's shape:
K = 128, chunk 64, bf16 q/k, bf16x3 products, Jacobi preconditioning.

    python benchmarks/tools/cg_sass_stats.py
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.sm90 import compile_sm90  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
ADDR = re.compile(r'\s+/\*([0-9a-f]{4,})\*/')


def sass(round_p, NR, num_warps, prec='bf16x3'):
    from fla_mesa.ops.mesa import chunk_cg
    types = dict(b='*bf16', k='*bf16', g='*fp32', beta='*fp32', lamb='*fp32', h_kk='*fp32', x='*fp32', steps='*i32',
                 max_steps='i32', tol2='fp32', T='i32')
    consts = dict(H=16, K=128, BT=64, NR=NR, BK=128, PREC=prec, PRECONDITION=True, ROUND_P=round_p, K_IS_BF16=True,
                  H_IN_LOOP=False, IS_VARLEN=False)
    kernel = compile_sm90(chunk_cg.chunk_mesa_fwd_kernel_cg, types, consts, num_warps=num_warps, num_stages=1)
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(kernel.asm['cubin'])
        f.flush()
        out = subprocess.run([os.path.join(BIN, 'cuobjdump'), '-sass', f.name], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if ADDR.match(line)]


def stats(lines):
    """(loop instructions, loop HMMA, loop local loads/stores, kernel HMMA): the loop is the backward branch whose
    body holds the most HMMA (the CG loop)."""
    addr = [int(ADDR.match(line).group(1), 16) for line in lines]
    best = (0, 0, 0)
    for i, line in enumerate(lines):
        m = re.search(r'BRA\s+(0x[0-9a-f]+)', line)
        if not m or int(m.group(1), 16) >= addr[i]:
            continue
        body = [x for x, a in zip(lines, addr) if int(m.group(1), 16) <= a <= addr[i]]
        n = (len(body), sum('HMMA' in x for x in body), sum(op in x for x in body for op in ('LDL', 'STL')))
        best = max(best, n, key=lambda t: t[1])
    return best + (sum('HMMA' in x for x in lines),)


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"# CG kernel SASS for sm_90 (triton {triton.__version__}): per warp, one CG step and the whole kernel\n")
    print("| config | rounded directions | step instructions | step HMMA | step local ld/st | kernel HMMA |")
    print("|---|---|---|---|---|---|")
    for NR, num_warps in ((2, 8), (4, 4), (4, 8)):
        for round_p in (False, True):
            n, hmma, spill, total = stats(sass(round_p, NR, num_warps))
            print(f"| NR={NR} w{num_warps} | {'on' if round_p else 'off'} | {n} | {hmma} | {spill} | {total} |")


if __name__ == '__main__':
    main()
