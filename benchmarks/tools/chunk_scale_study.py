# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Which decay `a_c` should the chunk-start preconditioner `M_c = a_c H_c + Λ` use? The library takes the decay from the
chunk's start to its middle token (`precond.chunk_middle_scale`); this measures the mean CG steps a token of 'chunk'
and 'auto' with `a_c` the decay to another token of the chunk instead, on the PyTorch path (float32, defaults).

    python benchmarks/tools/chunk_scale_study.py            # T = 2048, H = 1, K = V = 128: about 5 minutes on 2 cores
    python benchmarks/tools/chunk_scale_study.py --T 1024 --K 64 --positions 0 16 32 48 63

A study, not a test: it replaces `ChunkPieces.chunk_start` for the run (the Triton path keeps the middle token).
"""

import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
sys.path.insert(0, ROOT)

from fla_mesa.ops.mesa import chunk_mesa, chunk_torch  # noqa: E402
from tests.ops.test_hard_states import FAMILIES as HARD_FAMILIES, hard_inputs  # noqa: E402

# the hard families of the tests, and a benign row (its Λ set to 1 below)
FAMILIES = dict(HARD_FAMILIES, **{'benign: random keys, γ = 0.98, Λ = 1': dict(dirs=0, gamma=0.98)})


def scale_at(position):
    def chunk_start(self):
        return self.H.detach(), self.decay[..., position, 0].detach(), self.lamb[:, :, 0].detach()
    return chunk_start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--T', type=int, default=2048)
    p.add_argument('--K', type=int, default=128)
    p.add_argument('--positions', type=int, nargs='+', default=[32, 0], help="tokens of the chunk (32: the middle)")
    args = p.parse_args()
    methods = ['chunk', 'auto']
    print(f"T = {args.T}, H = 1, K = V = {args.K}, float32, cg_max_steps 30, cg_tol 1e-4; mean steps a token "
          f"(every token, the first chunk's included); torch {torch.__version__}\n")
    print('| family | ' + ' | '.join(f'{m}, a at token {t}' for t in args.positions for m in methods) + ' |')
    print('|---|' + '---|' * (len(args.positions) * len(methods)))
    saved = chunk_torch.ChunkPieces.chunk_start
    try:
        for name, kw in FAMILIES.items():
            x = [t.float() for t in hard_inputs(args.T, H=1, K=args.K, V=args.K, **kw)]
            if 'Λ = 1' in name:
                x[5] = torch.ones_like(x[5])
            row = []
            for position in args.positions:
                chunk_torch.ChunkPieces.chunk_start = scale_at(position)
                for method in methods:
                    _, _, steps = chunk_mesa(*x, precondition=method, return_cg_steps=True, check_values=False)
                    row.append(f'{steps.float().mean():.2f}')
            print(f'| {name} | ' + ' | '.join(row) + ' |', flush=True)
    finally:
        chunk_torch.ChunkPieces.chunk_start = saved


if __name__ == '__main__':
    main()
