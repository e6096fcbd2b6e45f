# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Cheaper chunk-start factors, by their step counts (CPU, PyTorch path; issue 14): the factor `W` of every S-th chunk
reused for the next S - 1 chunks (S-fold fewer factorisations), and a float32 factorisation instead of float64.
The H200 study (benchmarks/results/solver_h200.md) found the float64 factorisation the main cost of 'chunk'.

    python benchmarks/tools/factor_variants.py [T]        # T = 1024: about a minute of one core
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from fla_mesa.ops.mesa import chunk_mesa, chunk_torch  # noqa: E402
from fla_mesa.ops.mesa.precond import chunk_start_factor  # noqa: E402
from tests.ops.test_hard_states import FAMILIES, hard_inputs, last_outputs  # noqa: E402
from tests.utils import rel_err  # noqa: E402


def shared(S, compute_dtype=torch.float64):
    """`chunk_start_factor` of every S-th chunk, repeated over the next S - 1."""
    def factor(h, a, lamb, dtype):
        w = chunk_start_factor(h[..., ::S, :, :], a[..., ::S], lamb, dtype, compute_dtype=compute_dtype)
        return w.repeat_interleave(S, dim=-3)[..., :h.shape[-3], :, :]
    return factor


def cell(name, x, ref, precondition):
    o, _, s = chunk_mesa(*x, precondition=precondition, return_cg_steps=True, check_values=False)
    s = s.float()
    return f"{name}: {s.mean():.2f}/{(s >= 30).float().mean() * 100:.0f}%/{rel_err(o[:, -4:], ref):.1e}"


def main():
    torch.set_num_threads(1)
    T, K = int(sys.argv[1]) if len(sys.argv) > 1 else 1024, 64
    families = dict(FAMILIES)
    families['benign: random keys, γ = 0.98, Λ = 1'] = dict(dirs=0, gamma=0.98)
    variants = [('S=1', shared(1)), ('S=1 fp32', shared(1, torch.float32))]
    variants += [(f'S={s}', shared(s)) for s in (2, 4, 8, 16)]
    print(f"T = {T}, K = V = {K}, H = 1, float32, defaults; mean steps / at cap / o error (floor)")
    for name, kw in families.items():
        x64 = hard_inputs(T, H=1, K=K, V=K, **kw)
        ref = last_outputs(*x64)
        x = [t.float() for t in x64]
        row = []
        for label, factor in variants:
            chunk_torch.chunk_start_factor = factor
            try:
                row.append(cell(label, x, ref, 'chunk'))
            finally:
                chunk_torch.chunk_start_factor = chunk_start_factor
        row.append(cell('jacobi', x, ref, True))
        print(f"{name} (floor {rel_err(last_outputs(*x), ref):.1e}):\n   " + "  ".join(row), flush=True)


if __name__ == '__main__':
    main()
