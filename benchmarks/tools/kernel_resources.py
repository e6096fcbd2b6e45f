# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Registers, local-memory spills and instruction counts of the chunk kernels at every GPU config of their autotune
lists, compiled for sm_90 on any machine (no GPU: Triton's own ptxas and cuobjdump, `tests/sm90.compile_sm90`): the
CG kernels (`cg`, `cg_bwd`), the output pass (`o`) and the gradient kernel (`grads`), at the training shape (bf16
q/k/v, K = V = 128, chunks of 64, bf16x3 products; the CG kernels as 'auto''s Jacobi first pass). Spills and
registers are per thread; `mma`: the tensor-core instructions (HMMA for mma.sync, HGMMA for wgmma).

    python benchmarks/tools/kernel_resources.py [--kernels grads o]
    # with the H200's compiler: pip install --no-deps --target /tmp/t36 triton==3.6.0, then
    PYTHONPATH=/tmp/t36 python benchmarks/tools/kernel_resources.py
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.gpu_configs import describe, gpu_configs  # noqa: E402
from tests.sm90 import compile_sm90  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
SHAPE = dict(H=8, K=128, V=128, BT=64, PREC='bf16x3', IS_VARLEN=False)
CG_TYPES = dict(b='*bf16', k='*bf16', g='*fp32', beta='*fp32', lamb='*fp32', h_kk='*fp32', factor='*fp32', need='*i32',
                items='*i32', v='*bf16', h_kv='*fp32', do='*bf16', x='*fp32', xl='*bf16', steps='*i32', max_steps='i32',
                tol2='fp32', T='i32')
CG_CONSTS = dict(SHAPE, BK=128, BV=64, PRECONDITION=1, ROUND_P=True, K_IS_BF16=True, V_IS_BF16=True, H_IN_LOOP=False,
                 FLAG_UNCONVERGED=True, F_IS_BF16=False, RESCUE=False, FIRST=True, DO_IS_BF16=True, XL=True)
# name -> (runtime argument types, constexprs other than the config's)
KERNELS = {
    'cg': (CG_TYPES, CG_CONSTS),
    # the first pass reads its right-hand side (dx, float32) from x's buffer
    'cg_bwd': (dict(CG_TYPES, b='*fp32'), CG_CONSTS),
    # the readout: x in float32, k, v and o in bf16
    'o': (dict(a='*fp32', d='*bf16', c='*bf16', g='*fp32', beta='*fp32', h='*fp32', out='*bf16', T='i32'),
          dict(SHAPE, M=128, N=128, A_IS_BF16=False, D_IS_BF16=True, C_IS_BF16=True, TRANS_G=False, ROUND=1)),
    'grads': (dict(x='*fp32', e='*fp32', do='*bf16', k='*bf16', v='*bf16', g='*fp32', beta='*fp32', h_kk='*fp32',
                   h_kv='*fp32', dh_kk='*fp32', dh_kv='*fp32', dk='*bf16', dv='*bf16', dg='*fp32', dbeta='*fp32',
                   dlamb='*fp32', T='i32', NTOK='i32'),
              dict(SHAPE, NS=4, K_IS_BF16=True, V_IS_BF16=True, DO_IS_BF16=True)),
}


def resources(compiled):
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(compiled.asm['cubin'])
        f.flush()
        res, sass = (subprocess.run([os.path.join(BIN, 'cuobjdump'), flag, f.name], capture_output=True, text=True).stdout
                     for flag in ('-res-usage', '-sass'))
    reg, stack = re.search(r'REG:(\d+) STACK:(\d+)', res).groups()
    lines = [line for line in sass.splitlines() if re.match(r'\s+/\*[0-9a-f]{4,}\*/', line)]
    return (int(reg), int(stack), sum('LDL' in line for line in lines), sum('STL' in line for line in lines),
            sum('MMA' in line for line in lines), len(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--kernels', nargs='+', default=list(KERNELS), choices=list(KERNELS))
    a = p.parse_args()
    configs = gpu_configs()
    print(f"# Chunk kernels compiled for sm_90 (triton {triton.__version__})\n")
    print("| kernel | config | registers | stack bytes | local loads | local stores | mma | instructions |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.kernels:
        tuner, cfgs = configs[name]
        types, consts = KERNELS[name]
        for c in cfgs:
            compiled = compile_sm90(tuner, types, dict(consts, **c.kwargs), num_warps=c.num_warps,
                                    num_stages=c.num_stages)
            print(f"| {name} | {describe(c)} | " + " | ".join(map(str, resources(compiled))) + " |", flush=True)


if __name__ == '__main__':
    main()
