# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Cheaper chunk-start factors, by their step counts (CPU, PyTorch path; issue 14): the factor `W` of every S-th chunk
reused for the next S - 1 chunks (S-fold fewer factorisations), and a float32 factorisation instead of float64.
The H200 study (benchmarks/results/solver_h200.md) found the float64 factorisation the main cost of 'chunk'.

    python benchmarks/tools/factor_variants.py [T]        # T = 1024: about a minute of one core
"""
import sys, torch
sys.path.insert(0, '.')
from fla_mesa.ops.mesa import chunk_mesa, chunk_torch
from fla_mesa.ops.mesa import precond
from tests.ops.test_hard_states import FAMILIES, hard_inputs, last_outputs
from tests.utils import rel_err
import tests.utils as tu
torch.set_num_threads(1)
orig = precond.chunk_start_factor

def shared(S, fp32=False):
    def f(h, a, lamb, dtype):
        NT = h.shape[-3]
        hs, as_ = h[..., ::S, :, :], a[..., ::S]
        if fp32:
            with torch.no_grad():
                K = h.shape[-1]
                m = as_.float()[..., None, None] * hs.float()
                m = (m + m.transpose(-1, -2)) / 2 + torch.diag_embed(lamb.float().expand(*as_.shape, K))
                L, info = torch.linalg.cholesky_ex(m)
                d = torch.diagonal(m, dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
                L = torch.where((info != 0)[..., None, None], torch.diag_embed(d), L)
                eye = torch.eye(K, device=m.device).expand_as(L)
                w = torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2).to(dtype)
        else:
            w = orig(hs, as_, lamb, dtype)
        return w.repeat_interleave(S, dim=-3)[..., :NT, :, :]
    return f

fams = dict(FAMILIES)
fams['benign: random keys, γ = 0.98, Λ = 1'] = dict(dirs=0, gamma=0.98)
T, K = int(sys.argv[1]) if len(sys.argv) > 1 else 1024, 64
variants = [('S=1', shared(1)), ('S=1 fp32', shared(1, True)), ('S=2', shared(2)), ('S=4', shared(4)), ('S=8', shared(8)), ('S=16', shared(16))]
print(f"T = {T}, K = V = {K}, H = 1, float32, defaults; mean steps / at cap / o error (floor)")
for name, kw in fams.items():
    x64 = hard_inputs(T, H=1, K=K, V=K, **kw)
    ref = last_outputs(*x64)
    x = [t.float() for t in x64]
    floor = rel_err(last_outputs(*x), ref)
    row = []
    for vname, fn in variants:
        chunk_torch.chunk_start_factor = fn
        o, _, s = chunk_mesa(*x, precondition='chunk', return_cg_steps=True, check_values=False)
        s = s.float()
        row.append(f"{vname}: {s.mean():.2f}/{(s >= 30).float().mean() * 100:.0f}%/{rel_err(o[:, -4:], ref):.1e}")
    chunk_torch.chunk_start_factor = orig
    o, _, s = chunk_mesa(*x, precondition=True, return_cg_steps=True, check_values=False)
    s = s.float()
    row.append(f"jacobi: {s.mean():.2f}/{(s >= 30).float().mean() * 100:.0f}%/{rel_err(o[:, -4:], ref):.1e}")
    print(f"{name} (floor {floor:.1e}):\n   " + "  ".join(row), flush=True)
