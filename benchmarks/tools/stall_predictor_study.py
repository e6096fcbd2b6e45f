# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Predictor study: which (chunk, head) pairs should skip Jacobi PCG and go straight to the chunk preconditioner?

    python benchmarks/tools/stall_predictor_study.py collect   # the solves (PyTorch path, float32) -> DATA
    python benchmarks/tools/stall_predictor_study.py analyse   # DATA -> benchmarks/results/stall_predictor_tables_cpu.md
    python benchmarks/tools/stall_predictor_study.py           # both

Per-token step counts come from `ChunkPieces` + `cg_solve` (the library's PyTorch path, as chunk_mesa's 'auto' runs
them: Jacobi with cg_tol 1e-4 / cap 30, the chunk preconditioner M_c = a H_c + Λ, its factor built once). Features
come from the chunk-start states `ChunkPieces.H` (float32 values, analysed in float64).
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from fla_mesa.ops.mesa.chunk_torch import ChunkPieces  # noqa: E402
from fla_mesa.ops.mesa.solver import cg_solve  # noqa: E402
from tests.ops.test_hard_states import FAMILIES  # noqa: E402

# the per-token data (about 100 MB): outside the checkout
DATA = os.path.join('/tmp', 'fla_mesa_stall_study', 'data.pt')
TABLES = os.path.join(ROOT, 'benchmarks', 'results', 'stall_predictor_tables_cpu.md')
C, TOL, CAP = 64, 1e-4, 30
PS = (3, 4, 6, 8, 10, 12)
CHUNK_STEP_COST = 2.0  # a chunk-start step costs ~2 Jacobi steps (the brief's figure): the 'cost' columns use it
torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------------------------
# inputs


def make_inputs(T, H, K, dirs=0, noise=0.0, gamma=0.98, beta=0.99, lamb='0.25', aniso=None, knorm='unit',
                gate=None, seed=0):
    """
    float64 inputs as tests/ops/test_hard_states.py `hard_inputs`, generalised: `dirs` key directions (0: random),
    `noise`, γ constant (`gate=(mu, sigma)`: g = logsigmoid(N(mu, sigma)) per token instead), β a float or 'u'
    (U(0, 1)), Λ '0.25' / '1' / 'softplus' (0.25 + softplus(N(0, 1)), hard_inputs') / 'softplus_u' (0.25 +
    softplus(U(0,1)), benchmark_chunk's), `aniso` -1 or -2 (keys scaled by logspace(0, aniso, K) before the unit
    normalisation), `knorm` 'unit' / 'lognormal' (norms exp(N(0, 0.5))) / 'small' (0.3) / 'large' (3).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    if dirs:
        d = F.normalize(randn(H, dirs, K), dim=-1)
        k = d[torch.arange(H), torch.randint(0, dirs, (1, T, H), generator=gen)] + noise * randn(1, T, H, K)
    else:
        k = randn(1, T, H, K)
    if aniso:
        k = k * torch.logspace(0, aniso, K, dtype=torch.float64)
    k = F.normalize(k, dim=-1)
    if knorm == 'lognormal':
        k = k * (0.5 * randn(1, T, H, 1)).exp()
    elif knorm == 'small':
        k = k * 0.3
    elif knorm == 'large':
        k = k * 3.0
    q = F.normalize(randn(1, T, H, K), dim=-1)
    v = randn(1, T, H, 8)
    if gate is not None:
        g = F.logsigmoid(randn(1, T, H) * gate[1] + gate[0])
    else:
        g = torch.full((1, T, H), gamma, dtype=torch.float64).log()
    if beta == 'u':
        b = torch.rand(1, T, H, generator=gen, dtype=torch.float64)
    else:
        b = torch.full((1, T, H), beta, dtype=torch.float64)
    if lamb == 'softplus':
        lam = 0.25 + F.softplus(randn(H, K))
    elif lamb == 'softplus_u':
        lam = 0.25 + F.softplus(torch.rand(H, K, generator=gen, dtype=torch.float64))
    else:
        lam = torch.full((H, K), float(lamb), dtype=torch.float64)
    return q, k, v, g, b, lam


def configs():
    """(group, name, kwargs) of every run: the 7 hard families, benign random states, and the sweep between them."""
    out = []
    fam_defaults = dict(dirs=8, noise=0.0, gamma=0.9999, beta=0.99, lamb='0.25')
    for name, kw in FAMILIES.items():
        kw = dict(fam_defaults, **kw)
        if kw.pop('softplus_lamb', False):
            kw['lamb'] = 'softplus'
        if kw.pop('anisotropic', False):
            kw['aniso'] = -2
        for K, T in ((64, 2048), (128, 2048)):
            out.append(('family', name, dict(kw, K=K, T=T, H=4)))
    # benign: random unit keys, γ in {0.9, 0.95, 0.98, 0.99}, β U(0,1) or 0.99, Λ 1 / 0.25 / softplus
    i = 0
    for gamma in (0.9, 0.95, 0.98, 0.99):
        for beta in ('u', 0.99):
            for lamb in ('1', '0.25', 'softplus_u'):
                for K in (64, 128):
                    i += 1
                    T = 1024 if (i % 2) else 2048
                    out.append(('benign', f"γ={gamma} β={beta} Λ={lamb}",
                                dict(dirs=0, gamma=gamma, beta=beta, lamb=lamb, K=K, T=T, H=4, seed=100 + i)))
    # layer-like gates: g = logsigmoid(N(mu, 1)) (tests/utils.make_inputs' and benchmark_chunk's)
    for mu in (3.0, 4.0):
        for K in (64, 128):
            out.append(('benign', f"gate N({mu:g},1) β=u Λ=softplus_u",
                        dict(dirs=0, gate=(mu, 1.0), beta='u', lamb='softplus_u', K=K, T=2048, H=4, seed=200 + K)))
    # sweep: key directions x noise x γ (K = 64, T = 1024; K = 128 for a subset)
    for dirs in (1, 2, 4, 8, 16, 32, 64):
        for noise in (0.0, 1e-2, 1e-1):
            for gamma in (0.98, 0.999, 0.9999, 1.0):
                out.append(('sweep', f"dirs={dirs} noise={noise:g} γ={gamma}",
                            dict(dirs=dirs, noise=noise, gamma=gamma, beta=0.99, lamb='0.25', K=64, T=1024, H=4,
                                 seed=300 + dirs)))
    for dirs in (2, 8, 32, 128):
        for noise in (0.0, 1e-1):
            for gamma in (0.98, 0.9999):
                out.append(('sweep', f"K128 dirs={dirs} noise={noise:g} γ={gamma}",
                            dict(dirs=dirs, noise=noise, gamma=gamma, beta=0.99, lamb='0.25', K=128, T=1024, H=4,
                                 seed=400 + dirs)))
    # anisotropic keys, non-unit key norms, Λ = 1 / softplus variants
    for aniso in (-1, -2):
        for gamma in (0.98, 0.999, 0.9999, 1.0):
            for K in (64, 128):
                out.append(('sweep', f"aniso logspace(0,{aniso}) γ={gamma} K={K}",
                            dict(dirs=0, aniso=aniso, gamma=gamma, beta=0.99, lamb='0.25', K=K, T=1024, H=4,
                                 seed=500 + K)))
    for knorm in ('lognormal', 'small', 'large'):
        for dirs in (0, 8):
            for gamma in (0.98, 0.9999):
                out.append(('sweep', f"knorm={knorm} dirs={dirs} γ={gamma}",
                            dict(dirs=dirs, knorm=knorm, gamma=gamma, beta='u', lamb='softplus', K=64, T=1024, H=4,
                                 seed=600)))
    for lamb in ('1', 'softplus'):
        for dirs in (4, 16):
            for gamma in (0.999, 0.9999):
                out.append(('sweep', f"Λ={lamb} dirs={dirs} noise=1e-2 γ={gamma}",
                            dict(dirs=dirs, noise=1e-2, gamma=gamma, beta=0.99, lamb=lamb, K=64, T=1024, H=4,
                                 seed=700)))
    # long: T = 4096
    for name, kw in (('long random γ=0.999', dict(dirs=0, gamma=0.999)),
                     ('long dirs=16 noise=0.1 γ=0.999', dict(dirs=16, noise=0.1, gamma=0.999)),
                     ('long dirs=4 noise=1e-2 γ=1', dict(dirs=4, noise=1e-2, gamma=1.0))):
        out.append(('sweep', name, dict(kw, beta=0.99, lamb='0.25', K=64, T=4096, H=4, seed=800)))
    return out


# ------------------------------------------------------------------------------------------------------------------
# solves and features


def decode(steps):
    bad = steps < 0
    return torch.where(bad, ~steps, steps), bad


def relres(pieces, b, x):
    r = b - pieces.matvec(x)
    return r.norm(dim=-1) / b.norm(dim=-1)


def features(pieces):
    """Per (B, H, NT) candidates from the chunk-start state, the ridge, a (decay to the chunk middle), the row diags."""
    Hc = pieces.H.double()                                    # [B, H, NT, K, K]
    Hc = (Hc + Hc.transpose(-1, -2)) / 2
    a = pieces.decay[..., C // 2, 0].double()                 # [B, H, NT]
    lam = pieces.lamb[:, :, 0].double()                       # [1, H, 1, K]
    K = Hc.shape[-1]
    aH = a[..., None, None] * Hc
    hd = torch.diagonal(aH, dim1=-2, dim2=-1)                 # a diag(H_c)
    D = hd + lam                                              # diag(M_c)
    A = aH + torch.diag_embed(lam.expand_as(D))
    dis = D.rsqrt()
    S = A * dis[..., :, None] * dis[..., None, :]             # Jacobi-scaled M_c
    off2 = (S * S).sum((-2, -1)) - (torch.diagonal(S, dim1=-2, dim2=-1) ** 2).sum(-1)
    fF = off2.clamp_min(0).sqrt()                             # ‖F‖_F
    ratio = D / lam
    dmax = ratio.amax(-1)                                     # max_i d_i / λ_i
    # the row diagonals d_t = diag(H_t) + λ of every token of the chunk (in-chunk keys included)
    drow = (pieces.diag.double() / pieces.lamb.double()).amax((-2, -1))
    trH = hd.sum(-1)
    fro2 = (aH * aH).sum((-2, -1))
    pr = trH ** 2 / fro2.clamp_min(1e-300)                    # participation ratio of a H_c
    lmean = lam.mean(-1).expand_as(trH)
    tr_l = trH / lmean                                        # tr(a H_c) / mean(λ)
    spike = fro2 / trH.clamp_min(1e-300) / lmean              # ≈ λ_max(aH)/λ: ‖aH‖_F² / (tr(aH) mean λ)
    # Jacobi-scaled spectrum (reference only: an eigendecomposition is not cheap in the kernel)
    ev = torch.linalg.eigvalsh(S)
    kJ = ev[..., -1] / ev[..., 0]
    # the number of Jacobi-scaled eigenvalues far from the bulk: outliers CG must resolve one step each
    n_small = (ev < 0.1).sum(-1).double()
    # the key part of Jacobi scaling: max_i (a H_ii)/λ_i ≈ dmax - 1; spread of λ_i/D_i ∈ (0, 1]
    sub = (lam / D)
    spread = sub.amax(-1) / sub.amin(-1)
    # cheap power-iteration estimate of ‖F‖_2 (4 matvecs of the tile)
    Fm = S - torch.diag_embed(torch.diagonal(S, dim1=-2, dim2=-1))
    v = torch.ones_like(D) / math.sqrt(K)
    for _ in range(4):
        v = (Fm @ v[..., None])[..., 0]
        n = v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        v = v / n
    f2 = n[..., 0]
    return dict(fF=fF, dmax=dmax, drow=drow, fF_sqrt_dmax=fF * dmax.sqrt(), kub=(1 + fF) * dmax, pr=pr, tr_l=tr_l,
                spike=spike, kJ=kJ, n_small=n_small, spread=spread, f2=f2, kub2=(1 + f2) * dmax, a=a)


def run_config(kw):
    kw = dict(kw)
    T, H, K = kw.pop('T'), kw.pop('H'), kw.pop('K')
    q, k, v, g, beta, lamb = (x.float() for x in make_inputs(T, H, K, **kw))
    pieces = ChunkPieces(k, v, g, beta, lamb, None, C)
    b = pieces.chunk(q)
    cs = pieces.chunk_start_preconditioner()
    mv, dg = pieces.matvec, pieces.diag
    out = {}
    with torch.no_grad():
        x30, s = cg_solve(mv, b, dg, CAP, TOL, True, flag_unconverged=True)
        out['jac'], out['jac_bad'] = decode(s)
        # 'auto': chunk-start rescue from Jacobi's iterate for the rows Jacobi leaves above tol
        _, s = cg_solve(mv, b, dg, CAP, TOL, cs, flag_unconverged=True, x0=x30, rows=out['jac_bad'])
        out['rescue'], out['rescue_bad'] = decode(s)
        # chunk-start from the Jacobi start
        _, s = cg_solve(mv, b, dg, CAP, TOL, cs, flag_unconverged=True)
        out['chk'], out['chk_bad'] = decode(s)
        for P in PS:
            xP, s = cg_solve(mv, b, dg, P, TOL, True, flag_unconverged=True)
            sP, badP = decode(s)
            out[f'jac{P}'] = sP
            out[f'res{P}'] = relres(pieces, b, xP).float()
            # chunk-start from Jacobi's iterate at P for every row still above tol there
            _, s = cg_solve(mv, b, dg, CAP, TOL, cs, flag_unconverged=True, x0=xP, rows=badP)
            out[f'chk{P}'], out[f'chk{P}_bad'] = decode(s)
        feats = features(pieces)
    # per-token arrays [B, H, NT, C] -> [H*NT, C]; features [B, H, NT] -> [H*NT]
    res = {k_: t.reshape(-1, C) for k_, t in out.items()}
    res.update({k_: t.reshape(-1).float() for k_, t in feats.items()})
    res['fF_rms'] = res['fF'] / math.sqrt(K)
    res['chunk_idx'] = torch.arange(pieces.H.shape[2]).expand(H, -1).reshape(-1)
    return res


def collect():
    rows = []
    t0 = time.time()
    cfgs = configs()
    for i, (group, name, kw) in enumerate(cfgs):
        t1 = time.time()
        r = run_config(kw)
        r.update(group=group, name=name, K=kw['K'], T=kw['T'])
        rows.append(r)
        jm = r['jac'].float().mean().item()
        print(f"[{i + 1}/{len(cfgs)}] {group:7s} {name:45s} K={kw['K']:3d} T={kw['T']}: jacobi {jm:5.2f} "
              f"unconv {r['jac_bad'].float().mean().item():.3f} chunk {r['chk'].float().mean().item():5.2f} "
              f"({time.time() - t1:.1f} s, total {time.time() - t0:.0f} s)", flush=True)
    os.makedirs(os.path.dirname(DATA), exist_ok=True)
    torch.save(rows, DATA)


# ------------------------------------------------------------------------------------------------------------------
# analysis


CANDIDATES = {
    'fF': "‖F‖_F, F = offdiag(D^-1/2 M_c D^-1/2), D = diag(M_c), M_c = aH_c + Λ",
    'fF_rms': "‖F‖_F/sqrt(K) (K-normalised ‖F‖_F)",
    'dmax': "max_i D_i/λ_i",
    'drow': "max_{t,i} d_t,i/λ_i (row diagonals, in-chunk keys included)",
    'fF_sqrt_dmax': "‖F‖_F · sqrt(max_i D_i/λ_i)",
    'kub': "κ bound (1+‖F‖_F) · max_i D_i/λ_i",
    'kub2': "κ bound (1+‖F‖_2 by 4 power steps) · max_i D_i/λ_i",
    'spike': "‖aH_c‖_F² / (tr(aH_c) · mean λ)  (= (tr/meanλ)/PR)",
    'tr_l': "tr(aH_c)/mean λ",
    'kJ': "exact κ(D^-1/2 M_c D^-1/2) (reference, not cheap)",
    'n_small': "#eigs of Jacobi-scaled M_c below 0.1 (reference, not cheap)",
}


def chunk_table(rows):
    """Flattens per-(chunk, head) quantities over every run."""
    cat = {}
    for r in rows:
        n = r['jac'].shape[0]
        d = dict(group=[r['group']] * n, name=[r['name']] * n, run=[id(r)] * n, K=[r['K']] * n)
        for k_, t in d.items():
            cat.setdefault(k_, []).extend(t)
        for k_, t in r.items():
            if torch.is_tensor(t):
                cat.setdefault(k_, []).append(t)
    return {k_: (torch.cat(v) if torch.is_tensor(v[0]) else v) for k_, v in cat.items()}


def hybrid_cost(ct, send_static, P, send_dyn):
    """Static sends (chunk-start from the start) first; the rest run Jacobi P steps and go on as `scheme_cost(P)`."""
    jd, cd = scheme_cost(ct, send_dyn & ~send_static, P)
    js, cs_ = scheme_cost(ct, send_static)
    return torch.where(send_static, js, jd), torch.where(send_static, cs_, cd)


def tile_cost(ct, send, P=None, send_static=None):
    """The kernel's view: a chunk's tile loops until its last row stops, so per chunk max-over-rows steps."""
    jac_full, resc = ct['jac'].amax(-1).float(), ct['rescue'].amax(-1).float()
    if send_static is None:
        send_static = torch.zeros_like(send)
    if P is None:
        j = torch.where(send, torch.zeros_like(jac_full), jac_full)
        c = torch.where(send, ct['chk'].amax(-1).float(), resc)
    else:
        j = torch.where(send, ct[f'jac{P}'].amax(-1).float(), jac_full)
        c = torch.where(send, ct[f'chk{P}'].amax(-1).float(), resc)
    j = torch.where(send_static, torch.zeros_like(j), j)
    c = torch.where(send_static, ct['chk'].amax(-1).float(), c)
    return j + CHUNK_STEP_COST * c


def scheme_cost(ct, send, P=None):
    """
    Per-chunk mean steps a token (jacobi, chunk) of a routing: `send` [N] bool.
    Static (P None): sent chunks: chunk-start from the Jacobi start; others: Jacobi, + rescue where it stalls.
    Dynamic (P): every chunk runs Jacobi P steps; sent chunks then chunk-start (from x_P) for rows above tol; others
    continue Jacobi to 30 (+ rescue).
    """
    jac_full = ct['jac'].float()
    resc = ct['rescue'].float()
    if P is None:
        j = torch.where(send[:, None], torch.zeros_like(jac_full), jac_full)
        c = torch.where(send[:, None], ct['chk'].float(), resc)
    else:
        j = torch.where(send[:, None], ct[f'jac{P}'].float(), jac_full)
        c = torch.where(send[:, None], ct[f'chk{P}'].float(), resc)
    return j.mean(-1), c.mean(-1)


def analyse():
    rows = torch.load(DATA, weights_only=False)
    ct = chunk_table(rows)
    Kt = torch.tensor(ct['K'])
    if 'fF_rms' not in ct:
        ct['fF_rms'] = ct['fF'] / Kt.float().sqrt()
    group = ct['group']
    names = ct['name']
    N = len(group)
    jmax = ct['jac'].amax(-1)
    stall = ct['jac_bad'].any(-1)
    hard = (jmax > 12) | stall
    first = ct['chunk_idx'] == 0
    lines = ["# tables (generated by study.py analyse)", ""]
    lines.append(f"{N} (chunk, head) pairs from {len(rows)} runs; hard = Jacobi max steps over the chunk's rows > 12 "
                 f"or a row unconverged at 30: {int(hard.sum())} hard, {int((~hard).sum())} not. "
                 f"Cost = Jacobi steps + {CHUNK_STEP_COST:g} x chunk-start steps (mean a token).")
    lines.append("")

    def groups_of(mask_fn):
        return torch.tensor([mask_fn(g_, n_) for g_, n_ in zip(group, names)])

    fam_mask = {'all hard families': groups_of(lambda g_, n_: g_ == 'family')}
    for fam in FAMILIES:
        fam_mask[fam] = groups_of(lambda g_, n_, f=fam: g_ == 'family' and n_ == f)
    fam_mask['benign'] = groups_of(lambda g_, n_: g_ == 'benign')
    fam_mask['sweep'] = groups_of(lambda g_, n_: g_ == 'sweep')
    fam_mask['all'] = torch.ones(N, dtype=torch.bool)

    def summary(send, P=None):
        j, c = scheme_cost(ct, send, P)
        steps = j + c
        cost = j + CHUNK_STEP_COST * c
        return {k_: (steps[m].mean().item(), cost[m].mean().item()) for k_, m in fam_mask.items()}

    # baselines
    none = torch.zeros(N, dtype=torch.bool)
    base = {'auto (Jacobi + rescue)': summary(none), "'chunk' everywhere": summary(~none)}
    # oracle: per chunk the cheaper of the two static routings
    j0, c0 = scheme_cost(ct, none)
    j1, c1 = scheme_cost(ct, ~none)
    oracle = (j1 + CHUNK_STEP_COST * c1) < (j0 + CHUNK_STEP_COST * c0)
    base['oracle static routing (cheaper per chunk)'] = summary(oracle)
    base['route = label (hard → chunk)'] = summary(hard)
    lines += ["## baselines: mean steps a token (cost in Jacobi-step units)", "",
              "| scheme | " + " | ".join(fam_mask) + " |", "|---" * (len(fam_mask) + 1) + "|"]
    for name, s in base.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f} ({b:.2f})" for a, b in s.values()) + " |")
    lines.append("")
    lines.append(f"label vs oracle: oracle sends {int(oracle.sum())} chunks; of those {int((oracle & hard).sum())} "
                 f"are hard; hard chunks the oracle keeps on Jacobi: {int((hard & ~oracle).sum())}")
    lines.append("")
    base_cost = {k_: v[1] for k_, v in base['auto (Jacobi + rescue)'].items()}

    def objective(s):
        # a routing must not slow benign states, and should recover most of the hard families' gap
        return s['all hard families'][1] + s['sweep'][1] + 3 * s['benign'][1]

    def auc(f, lab):
        # probability a hard chunk scores above a benign one (ties half)
        pos, neg = f[lab], f[~lab]
        if len(pos) == 0 or len(neg) == 0:
            return float('nan')
        allv = torch.cat([pos, neg])
        rank = allv.argsort().argsort().double() + 1
        # average ties roughly: fine for a study
        rp = rank[:len(pos)].sum()
        return ((rp - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))).item()

    best = {}
    for key, desc in CANDIDATES.items():
        f = ct[key].double()
        f = torch.where(torch.isfinite(f), f, torch.full_like(f, 1e30))
        qs = torch.quantile(f.float(), torch.linspace(0.02, 0.98, 49)).double().unique()
        lines += [f"## {key}: {desc}", "",
                  f"AUC(hard vs not) = {auc(f, hard):.3f}; without first chunks (H_c = 0) {auc(f[~first], hard[~first]):.3f}; "
                  f"AUC(oracle-send vs oracle-keep) = {auc(f, oracle):.3f}, without first chunks "
                  f"{auc(f[~first], oracle[~first]):.3f}",
                  "", "| threshold | hard caught | not-hard misrouted | benign chunks sent | oracle-send caught | "
                  "oracle-keep sent | families steps (cost) | "
                  "benign steps (cost) | sweep steps (cost) |", "|---|---|---|---|---|---|---|---|---|"]
        cands = []
        for t in qs.tolist():
            send = f > t
            s = summary(send)
            cands.append((objective(s), t, send, s))
        cands.sort(key=lambda x: x[0])
        shown = {cands[0][1]} | set(qs[::6].tolist())
        for obj, t, send, s in sorted(cands, key=lambda x: x[1]):
            if t not in shown:
                continue
            mark = " **best**" if t == cands[0][1] else ""
            lines.append(f"| {t:.4g}{mark} | {(send & hard).sum() / hard.sum():.1%} | "
                         f"{(send & ~hard).sum() / (~hard).sum():.1%} | "
                         f"{(send & fam_mask['benign']).sum() / fam_mask['benign'].sum():.1%} | "
                         f"{(send & oracle).sum() / oracle.sum():.1%} | {(send & ~oracle).sum() / (~oracle).sum():.1%} | "
                         f"{s['all hard families'][0]:.2f} ({s['all hard families'][1]:.2f}) | "
                         f"{s['benign'][0]:.2f} ({s['benign'][1]:.2f}) | {s['sweep'][0]:.2f} ({s['sweep'][1]:.2f}) |")
        lines.append("")
        best[key] = cands[0]

    # dynamic rules
    lines += ["## dynamic: Jacobi for P steps, then chunk-start (from x_P) for chunks with a row above ρ "
              "(ρ = tol: the brief's rule 5)", "",
              "| P | ρ | hard caught | not-hard sent | benign chunks sent | families steps (cost) | benign steps (cost) | "
              "sweep steps (cost) |", "|---|---|---|---|---|---|---|---|"]
    dyn = []
    for P in PS:
        maxres = ct[f'res{P}'].amax(-1)
        for rho in (TOL, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
            send = maxres > rho
            s = summary(send, P)
            dyn.append((objective(s), P, rho, send, s))
            lines.append(f"| {P} | {rho:g} | {(send & hard).sum() / hard.sum():.1%} | "
                         f"{(send & ~hard).sum() / (~hard).sum():.1%} | "
                         f"{(send & fam_mask['benign']).sum() / fam_mask['benign'].sum():.1%} | "
                         f"{s['all hard families'][0]:.2f} ({s['all hard families'][1]:.2f}) | "
                         f"{s['benign'][0]:.2f} ({s['benign'][1]:.2f}) | {s['sweep'][0]:.2f} ({s['sweep'][1]:.2f}) |")
    lines.append("")
    dyn.sort(key=lambda x: x[0])
    for obj, P, rho, send, s in dyn[:1]:
        best[f'dynamic P={P} ρ={rho:g}'] = (obj, None, send, s)
    for P in (8, 12):
        for d in dyn:
            if d[1] == P and d[2] == TOL:
                best[f'dynamic P={P} ρ=tol'] = (d[0], None, d[3], d[4])

    # candidate 4 as a 2-D rule: participation ratio low AND tr(aH)/mean λ high
    pr, trl = ct['pr'].double(), ct['tr_l'].double()
    grid = []
    for p0 in (2, 4, 8, 16, 32, 48):
        for t0 in (10, 30, 100, 300, 1000):
            send = (pr < p0) & (trl > t0)
            s_ = summary(send)
            grid.append((objective(s_), p0, t0, send, s_))
    grid.sort(key=lambda x: x[0])
    lines += ["## candidate 4 as a 2-D rule: PR = tr(aH_c)²/‖aH_c‖_F² < p0 and tr(aH_c)/mean λ > t0 (best 8 of a 6x5 grid)", "",
              "| p0 | t0 | hard caught | not-hard sent | benign chunks sent | families | benign | sweep | all |",
              "|---|---|---|---|---|---|---|---|---|"]
    for obj, p0, t0, send, s_ in grid[:8]:
        lines.append(f"| {p0} | {t0} | {(send & hard).sum() / hard.sum():.1%} | {(send & ~hard).sum() / (~hard).sum():.1%} | "
                     f"{(send & fam_mask['benign']).sum() / fam_mask['benign'].sum():.1%} | "
                     + " | ".join(f"{s_[g_][0]:.2f} ({s_[g_][1]:.2f})" for g_ in ('all hard families', 'benign', 'sweep', 'all'))
                     + " |")
    lines.append("")
    best[f'PR<{grid[0][1]} & tr/λ>{grid[0][2]}'] = (grid[0][0], None, grid[0][3], grid[0][4])

    # the recommended rule, finely: ‖F‖_F > τ, per K
    f = ct['fF'].double()
    lines += ["## ‖F‖_F > τ, fine sweep (per K: hard caught / not-hard sent; oracle-send caught / oracle-keep sent; "
              "steps (cost) by group)", "",
              "| τ | K=64 hard caught | K=64 not-hard sent | K=128 hard caught | K=128 not-hard sent | oracle-send caught | "
              "oracle-keep sent | families | benign | sweep | all |", "|---" * 11 + "|"]
    for tau in (3, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5, 8, 9, 10, 12, 15):
        send = f > tau
        s_ = summary(send)
        cells = []
        for k_ in (64, 128):
            m = Kt == k_
            cells += [f"{(send & hard & m).sum() / (hard & m).sum():.1%}", f"{(send & ~hard & m).sum() / (~hard & m).sum():.1%}"]
        lines.append(f"| {tau:g} | " + " | ".join(cells) + f" | {(send & oracle).sum() / oracle.sum():.1%} | "
                     f"{(send & ~oracle).sum() / (~oracle).sum():.1%} | "
                     + " | ".join(f"{s_[g_][0]:.2f} ({s_[g_][1]:.2f})" for g_ in ('all hard families', 'benign', 'sweep', 'all'))
                     + " |")
    lines.append("")
    # hybrid: static ‖F‖_F > τ, then the P-step residual check for the rest
    lines += ["## hybrid: ‖F‖_F > τ → chunk-start at once; the rest Jacobi P steps, then chunk-start if a row's "
              "relative residual > ρ", "",
              "| τ | P | ρ | families | benign | sweep | all |", "|---|---|---|---|---|---|---|"]
    for tau in (6.0, 7.0):
        for P in (3, 4, 6, 8):
            for rho in (1e-2, 3e-2, 1e-1):
                send_s = f > tau
                send_d = ct[f'res{P}'].amax(-1) > rho
                j, c = hybrid_cost(ct, send_s, P, send_d)
                st, co = j + c, j + CHUNK_STEP_COST * c
                lines.append(f"| {tau:g} | {P} | {rho:g} | " + " | ".join(
                    f"{st[fam_mask[g_]].mean():.2f} ({co[fam_mask[g_]].mean():.2f})"
                    for g_ in ('all hard families', 'benign', 'sweep', 'all')) + " |")
    lines.append("")
    # tile view
    lines += ["## the kernel's view: mean over chunks of (max-over-rows Jacobi steps + 2 x max-over-rows chunk-start "
              "steps)", "", "| scheme | " + " | ".join(fam_mask) + " |", "|---" * (len(fam_mask) + 1) + "|"]
    tiles = {'auto': tile_cost(ct, none), "'chunk' everywhere": tile_cost(ct, ~none),
             '‖F‖_F > 6.5': tile_cost(ct, f > 6.5), '‖F‖_F > 7': tile_cost(ct, f > 7),
             'dynamic P=4 ρ=0.1': tile_cost(ct, ct['res4'].amax(-1) > 0.1, 4),
             '‖F‖_F > 7, else P=4 ρ=0.1': tile_cost(ct, ct['res4'].amax(-1) > 0.1, 4, f > 7)}
    for name, tc in tiles.items():
        lines.append(f"| {name} | " + " | ".join(f"{tc[m].mean():.2f}" for m in fam_mask.values()) + " |")
    lines.append("")
    # first chunks (H_c = 0 without an initial state): what no chunk-start feature can see
    lines += [f"first chunks: {int(first.sum())} of {N}, {int((first & hard).sum())} hard; their M_c = Λ, so the "
              f"chunk-start solve there is Λ-preconditioned CG: mean steps Jacobi {ct['jac'][first].float().mean():.2f}"
              f" (+ rescue {ct['rescue'][first].float().mean():.2f}), chunk-start {ct['chk'][first].float().mean():.2f}",
              ""]

    best['fF > 7 (recommended: ‖F‖_F² > 49)'] = (None, 7.0, f > 7.0, summary(f > 7.0))

    # per family table at each candidate's best threshold
    lines += ["## per family at each candidate's best threshold: mean steps a token (cost)", "",
              "| candidate | threshold | " + " | ".join(fam_mask) + " |", "|---" * (len(fam_mask) + 2) + "|"]
    for name, s in base.items():
        lines.append(f"| {name} | - | " + " | ".join(f"{a:.2f} ({b:.2f})" for a, b in s.values()) + " |")
    for key, (obj, t, send, s) in best.items():
        th = '-' if t is None else f"{t:.4g}"
        lines.append(f"| {key} | {th} | " + " | ".join(f"{a:.2f} ({b:.2f})" for a, b in s.values()) + " |")
    lines.append("")

    # the worst benign/sweep runs for the best static rules: where they misroute
    lines += ["## per run (sweep + benign + families): auto, chunk, and the best rules' cost", "",
              "| group | run | K | hard share | auto | chunk | " + " | ".join(k_ for k_ in ('fF', 'kub', 'spike', 'drow'))
              + " | " + " | ".join(k_ for k_ in best if k_.startswith('dynamic')) + " |",
              "|---" * (6 + 4 + sum(k_.startswith('dynamic') for k_ in best)) + "|"]
    runs = torch.tensor(ct['run'])
    jA, cA = scheme_cost(ct, none)
    jC, cC = scheme_cost(ct, ~none)
    for r in rows:
        m = runs == id(r)
        vals = []
        for key in ('fF', 'kub', 'spike', 'drow'):
            j, c = scheme_cost(ct, best[key][2])
            vals.append((j + CHUNK_STEP_COST * c)[m].mean().item())
        for key in best:
            if key.startswith('dynamic'):
                P = int(key.split('P=')[1].split()[0])
                j, c = scheme_cost(ct, best[key][2], P)
                vals.append((j + CHUNK_STEP_COST * c)[m].mean().item())
        lines.append(f"| {r['group']} | {r['name']} | {r['K']} | {hard[m].float().mean():.2f} | "
                     f"{(jA + CHUNK_STEP_COST * cA)[m].mean():.2f} | {(jC + CHUNK_STEP_COST * cC)[m].mean():.2f} | "
                     + " | ".join(f"{v:.2f}" for v in vals) + " |")
    lines.append("")
    # feature ranges by class
    lines += ["## feature quantiles (5%, 50%, 95%) by class", "", "| feature | hard | not hard | benign group |",
              "|---|---|---|---|"]
    for key in CANDIDATES:
        f = ct[key].double()

        def qq(x):
            return ", ".join(f"{v:.3g}" for v in torch.quantile(x.float(), torch.tensor([0.05, 0.5, 0.95])).tolist())
        lines.append(f"| {key} | {qq(f[hard])} | {qq(f[~hard])} | {qq(f[fam_mask['benign']])} |")
    lines.append("")
    with open(TABLES, 'w') as fh:
        fh.write('\n'.join(lines) + '\n')
    print('\n'.join(lines[:60]))


def kernel_ff2(h, a, lamb):
    """
    ‖F‖_F² as a Triton kernel would form it, in float32, from the chunk-start tile h [..., K, K], a [...] (decay to the
    chunk middle) and lamb [..., K]: u = 1/(a·diag(h) + λ); ‖F‖_F² = a² · Σ_{i≠j} h_ij² u_i u_j. One elementwise pass over
    the tile (square, two broadcast multiplies, a masked sum); no product.
    """
    h, a, lamb = h.float(), a.float(), lamb.float()
    K = h.shape[-1]
    u = 1.0 / (a[..., None] * torch.diagonal(h, dim1=-2, dim2=-1) + lamb)
    off = ~torch.eye(K, dtype=torch.bool)
    t = torch.where(off, h * h, torch.zeros_like(h)) * u[..., :, None] * u[..., None, :]
    return a * a * t.sum((-2, -1))


def validate(n=6):
    """The cost model against the library itself: `ChunkPieces.solve('auto', skip_jacobi=‖F‖_F > 7)` (the existing
    skip path of 'auto') gives the same mean steps as the model's static routing."""
    out = []
    for group, name, kw in [c for c in configs() if c[0] == 'family'][::2][:n]:
        kw = dict(kw)
        T, H, K = kw.pop('T'), kw.pop('H'), kw.pop('K')
        q, k, v, g, beta, lamb = (x.float() for x in make_inputs(T, H, K, **kw))
        pieces = ChunkPieces(k, v, g, beta, lamb, None, C)
        b = pieces.chunk(q)
        with torch.no_grad():
            feats = features(pieces)
            skip = feats['fF'] > 7.0
            ff2 = kernel_ff2(pieces.H, pieces.decay[..., C // 2, 0], pieces.lamb[:, :, 0])
            agree = ((ff2 > 49.0) == skip).float().mean().item()
            relerr = ((ff2.double().sqrt() - feats['fF']).abs() / feats['fF'].clamp_min(1e-6)).max().item()
            _, steps, _ = pieces.solve(b, CAP, TOL, 'auto', True, skip_jacobi=skip)
            lib = decode(steps)[0].float().mean().item()
        r = run_config(dict(kw, T=T, H=H, K=K))
        j, c = scheme_cost({k_: v_ for k_, v_ in r.items()}, r['fF'] > 7.0)
        out.append(f"{name} K={K}: library solve(skip_jacobi) {lib:.3f}, model {(j + c).mean().item():.3f}; "
                   f"float32 kernel formula ‖F‖_F² > 49 agrees on {agree:.1%} of chunks (max rel. diff {relerr:.1e})")
        print(out[-1], flush=True)
    return out


if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else 'all'
    if what in ('collect', 'all'):
        collect()
    if what in ('analyse', 'all'):
        analyse()
    if what in ('validate', 'all'):
        validate()
