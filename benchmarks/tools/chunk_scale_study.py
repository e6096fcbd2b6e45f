# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Which matrix should the chunk preconditioner factorise, and which should 'auto''s stall score read? The library takes
`M_c = (H_c + H_{c+1}) / 2 + Λ` (the mean of the chunk's start and end states) and scores `a_c (H_c + H_{c+1}) / 2 + Λ`
(`a_c` the decay from the chunk's start to its middle token). This measures the mean CG steps a token (every token,
the first chunk's included) of Jacobi, 'chunk' and 'auto' on the PyTorch path (float32, defaults) with other choices:

    start·a   M_c = a_c H_c + Λ, scored as it is (the definition before)
    start     M_c = H_c + Λ
    end       M_c = H_{c+1} + Λ
    mean      M_c = (H_c + H_{c+1}) / 2 + Λ, 'auto' scored without a_c
    library   the library's own (mean, scored with a_c)

    python benchmarks/tools/chunk_scale_study.py                       # T = 2048, H = 1, K = V = 128: a few minutes
    python benchmarks/tools/chunk_scale_study.py --T 8192 --variants start·a library

A study, not a test: it replaces `ChunkPieces.chunk_start` and `ChunkPieces.stall_score` for the run.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from fla_mesa.ops.mesa import chunk_mesa, chunk_torch  # noqa: E402
from fla_mesa.ops.mesa.precond import jacobi_stall_score  # noqa: E402
from stall_predictor_study import make_inputs  # noqa: E402
from tests.ops.test_hard_states import FAMILIES, hard_inputs  # noqa: E402

LIBRARY = chunk_torch.ChunkPieces.chunk_start, chunk_torch.ChunkPieces.stall_score


def middle(self):
    return self.decay[..., self.decay.shape[-2] // 2, 0].detach()


def variant(name):
    """`(chunk_start, stall_score)` of ChunkPieces for one variant."""
    if name == 'library':
        return LIBRARY

    def chunk_start(self):
        h, lamb = self.H.detach(), self.lamb[:, :, 0].detach()
        one = torch.ones_like(h[..., 0, 0])
        return {'start·a': lambda: (h, middle(self), lamb), 'start': lambda: (h, one, lamb),
                'end': lambda: (self.end_states(), one, lamb), 'mean': lambda: (h + self.end_states(), one / 2, lamb)}[name]()

    def stall_score(self):
        return jacobi_stall_score(*self.chunk_start())
    return chunk_start, stall_score


def cases(T, K):
    """The hard families of the tests (H = 1) and random-key states of the predictor study (H = 2)."""
    out = [(name, lambda kw=kw: hard_inputs(T, H=1, K=K, V=K, **kw)) for name, kw in FAMILIES.items()]
    for kw in [dict(gamma=0.98), dict(gamma=0.98, lamb='1'), dict(gamma=0.9, knorm='lognormal'),
               dict(gamma=0.98, knorm='lognormal'), dict(gamma=0.98, lamb='softplus', knorm='lognormal'),
               dict(gamma=0.999), dict(gamma=0.999, lamb='1', knorm='lognormal'), dict(gamma=0.9999, knorm='lognormal')]:
        name = 'random keys, ' + ', '.join(f'{k} {v}' for k, v in kw.items()) + ('' if 'lamb' in kw else ', lamb 0.25')
        out.append((name, lambda kw=kw: make_inputs(T, 2, K, **kw)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--T', type=int, default=2048)
    p.add_argument('--K', type=int, default=128)
    p.add_argument('--variants', nargs='+', default=['start·a', 'start', 'end', 'mean', 'library'])
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"T = {args.T}, K = V = {args.K}, float32, cg_max_steps 30, cg_tol 1e-4; mean steps a token (every token, "
          f"the first chunk's included); torch {torch.__version__}\n")
    cols = [f'{m}, {v}' for v in args.variants for m in ('chunk', 'auto')]
    print('| states | jacobi | ' + ' | '.join(cols) + ' |')
    print('|---|---|' + '---|' * len(cols))
    try:
        for name, make in cases(args.T, args.K):
            x = [t.float() for t in make()]
            _, _, steps = chunk_mesa(*x, precondition=True, return_cg_steps=True, check_values=False)
            row = [f'{steps.float().mean():.2f}']
            for v in args.variants:
                chunk_torch.ChunkPieces.chunk_start, chunk_torch.ChunkPieces.stall_score = variant(v)
                for method in ('chunk', 'auto'):
                    _, _, steps = chunk_mesa(*x, precondition=method, return_cg_steps=True, check_values=False)
                    row.append(f'{steps.float().mean():.2f}')
            print(f'| {name} | ' + ' | '.join(row) + ' |', flush=True)
    finally:
        chunk_torch.ChunkPieces.chunk_start, chunk_torch.ChunkPieces.stall_score = LIBRARY


if __name__ == '__main__':
    main()
