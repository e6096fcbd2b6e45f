# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Decoding with `fused_recurrent_mesa`: correctness on the GPU against float64, and the time of one token beside
fla's `mesa_net_decoding_one_step` (H = 16, D = 128, float32 states, bf16 q/k/v), with the state-traffic floor.

    python benchmarks/benchmark_decode.py --out benchmarks/results/decode_h200.md   # GPU
    python benchmarks/benchmark_decode.py --warm-start-study                        # CPU, float64

The warm-start study asks whether starting CG at the previous token's solution (instead of the Jacobi start
b / diag(A)) saves iterations to cg_tol = 1e-4, for queries with a given correlation between consecutive tokens.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_decode_inputs(B, H, K, V, T=1, device='cuda', dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device='cpu').manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen)

    q = F.normalize(randn(B, T, H, K), dim=-1).to(device, dtype)
    k = F.normalize(randn(B, T, H, K), dim=-1).to(device, dtype)
    v = randn(B, T, H, V).to(device, dtype)
    g = F.logsigmoid(randn(B, T, H) + 4).to(device)
    beta = torch.sigmoid(randn(B, T, H)).to(device)
    lamb = (F.softplus(randn(H, K)) + 0.25).to(device)
    return q, k, v, g, beta, lamb


def prefill_state(B, H, K, V, T=512, device='cuda'):
    """A realistic state, the one after a T-token prompt: H = Σ_t β_t (Π_{s>t} γ_s) k_t k_tᵀ, likewise S."""
    q, k, v, g, beta, lamb = make_decode_inputs(B, H, K, V, T=T, device=device, dtype=torch.float32, seed=1)
    w = beta * (g.flip(1).cumsum(1).flip(1) - g).exp()
    return (torch.einsum('bth,bthi,bthj->bhij', w, k, k).contiguous(),
            torch.einsum('bth,bthi,bthj->bhij', w, k, v).contiguous())


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item() if torch.isfinite(x).all() else float('inf')


CASES = [
    ('fp32, B2 T64 H4 K128 V128, 30 steps', 2, 64, 4, 128, 128, torch.float32, 30, None),
    ('fp32, B2 T64 H4 K128 V128, tol 1e-4', 2, 64, 4, 128, 128, torch.float32, 30, 1e-4),
    ('bf16 q/k/v, B2 T64 H4 K128 V128, 30 steps', 2, 64, 4, 128, 128, torch.bfloat16, 30, None),
    ('fp32, B1 T16 H2 K100 V60 (odd), 30 steps', 1, 16, 2, 100, 60, torch.float32, 30, None),
    ('fp32, B1 T16 H2 K256 V256 (H streamed), 60 steps', 1, 16, 2, 256, 256, torch.float32, 60, None),
    ('fp64, B1 T16 H2 K64 V32, 80 steps', 1, 16, 2, 64, 32, torch.float64, 80, None),
]


def correctness(lines, device='cuda', cases=CASES):
    from fla_mesa.ops.mesa import fused_recurrent_mesa, naive_exact_mesa, naive_recurrent_mesa
    lines += ['## Correctness on the GPU against float64 (naive_exact_mesa)', '',
              '| case | o rel. err | h_kk rel. err | h_kv rel. err | steps = naive_recurrent_mesa (float32) |',
              '|---|---|---|---|---|']
    for name, B, T, H, K, V, dtype, steps, tol in cases:
        q, k, v, g, beta, lamb = make_decode_inputs(B, H, K, V, T=T, device=device, dtype=torch.float64, seed=2)
        a = torch.randn(B, H, K, K, device=device, dtype=torch.float64)
        h0 = (a @ a.transpose(-1, -2) / K, torch.randn(B, H, K, V, device=device, dtype=torch.float64))
        inputs = [x.to(dtype) for x in (q, k, v)] + [g, beta, lamb]
        sdtype = torch.float64 if dtype == torch.float64 else torch.float32
        h0_in = tuple(h.to(sdtype) for h in h0)
        o, (h_kk, h_kv), n = fused_recurrent_mesa(*inputs, h0_in, output_final_state=True, cg_max_steps=steps,
                                                  cg_tol=tol, return_cg_steps=True)
        ref, (r_kk, r_kv) = naive_exact_mesa(*[x.double() for x in inputs], h0, output_final_state=True)
        match = '-'
        if dtype == torch.float32:
            _, _, n_ref = naive_recurrent_mesa(*inputs, h0_in, cg_max_steps=steps, cg_tol=tol, return_cg_steps=True)
            match = f"{(n == n_ref).float().mean().item():.3f} (max diff {(n - n_ref).abs().max().item()})"
        lines.append(f"| {name} | {rel(o, ref):.1e} | {rel(h_kk, r_kk):.1e} | {rel(h_kv, r_kv):.1e} | {match} |")
    lines.append('')


def timing(lines, device='cuda'):
    import triton
    from fla.ops.mesa_net.decoding_one_step import mesa_net_decoding_one_step

    from fla_mesa.ops.mesa import fused_recurrent_mesa
    from fla_mesa.ops.mesa.fused_recurrent import fused_recurrent_mesa_fwd, fused_recurrent_mesa_fwd_kernel

    def wall(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')

    def graph(fn):
        # GPU time alone: the calls replayed from a CUDA graph, as a serving decode loop runs them
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode='median')

    H, K = 16, 128
    rows = []
    for B in (1, 16, 64):
        state = prefill_state(B, H, K, K, device=device)
        q, k, v, g, beta, lamb = make_decode_inputs(B, H, K, K, device=device, seed=3)
        q1, k1, v1, g1, beta1 = (x[:, 0].contiguous() for x in (q, k, v, g, beta))
        h_kk, h_kv = state
        fns = {}
        for steps in (10, 30):
            fns[f'fla {steps}'] = lambda s=steps: mesa_net_decoding_one_step(q1, k1, v1, g1, lamb, beta1, h_kk, h_kv, s)
            fns[f'ours {steps}'] = lambda s=steps: fused_recurrent_mesa_fwd(
                q, k, v, g, beta, lamb, state, s, None, True, None, False)
        fns['ours tol'] = lambda: fused_recurrent_mesa_fwd(q, k, v, g, beta, lamb, state, 30, 1e-4, True, None, False)
        fns['copy'] = lambda: (h_kk.clone(), h_kv.clone())
        row = dict(B=B)
        for name, fn in fns.items():
            row[name] = wall(fn)
            row[name + ' graph'] = graph(fn)
        row['ours tol public'] = wall(lambda: fused_recurrent_mesa(q, k, v, g, beta, lamb, state, True, 30, 1e-4))
        _, _, n = fused_recurrent_mesa_fwd(q, k, v, g, beta, lamb, state, 30, 1e-4, True, None, True)
        row['mean steps'] = n.float().mean().item()
        row['nbytes'] = 2 * (h_kk.numel() + h_kv.numel()) * 4
        row['floor'] = row['nbytes'] / 3.0e12 * 1e3
        o_fla, _, _ = mesa_net_decoding_one_step(q1, k1, v1, g1, lamb, beta1, h_kk, h_kv, 30)
        o_ours, _, _ = fused_recurrent_mesa_fwd(q, k, v, g, beta, lamb, state, 30, None, True, None, False)
        row['fla vs ours'] = rel(o_fla, o_ours[:, 0])
        rows.append(row)
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    lines += [
        '## Decoding one token: H = 16, K = V = 128, bf16 q/k/v, float32 states after a 512-token prompt, ms', '',
        'Medians of `triton.testing.do_bench` ("wall": back-to-back calls, host overhead included) and of',
        '`do_bench_cudagraph` ("GPU": the calls replayed from a CUDA graph, as a serving decode loop runs them).',
        '"ours" is the host function `fused_recurrent_mesa_fwd`; "public" is `fused_recurrent_mesa` with its input checks',
        '(whose data-dependent part costs a host sync). Floor: reading and writing h_kk and h_kv once,',
        'B·H·2·(K² + K·V)·4 bytes, at 3.0 TB/s; "copy": torch cloning both states (the same bytes, a plain copy',
        'kernel).', '',
        '| B | mode | fla 10 steps | ours 10 steps | fla 30 steps | ours 30 steps | ours / fla (30) | ours tol 1e-4 '
        '| copy | floor @3 TB/s | ours 30 / floor |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        for mode, sfx in (('wall', ''), ('GPU', ' graph')):
            g = lambda n: r[n + sfx]  # noqa: E731
            lines.append(
                f"| {r['B']} | {mode} | {g('fla 10'):.4f} | {g('ours 10'):.4f} | {g('fla 30'):.4f} | {g('ours 30'):.4f} | "
                f"{g('ours 30') / g('fla 30'):.2f} | {g('ours tol'):.4f} | {g('copy'):.4f} | {r['floor']:.4f} | "
                f"{g('ours 30') / r['floor']:.1f} |"
            )
    lines += ['', 'Mean CG steps at cg_tol = 1e-4: ' + ', '.join(f"B{r['B']}: {r['mean steps']:.2f}" for r in rows),
              'Public `fused_recurrent_mesa` (wall, tol 1e-4): '
              + ', '.join(f"B{r['B']}: {r['ours tol public']:.4f}" for r in rows),
              "fla's output vs ours at 30 steps (rel.): " + ', '.join(f"B{r['B']}: {r['fla vs ours']:.1e}" for r in rows), '']

    # which config the autotuner picked for each key, the time of every config, and registers/spills
    tuner = fused_recurrent_mesa_fwd_kernel
    while not hasattr(tuner, 'cache') and hasattr(tuner, 'fn'):
        tuner = tuner.fn
    lines += ['### Autotuning (key: NH, H, K, V, BK, H_IN_REGS, SOLVE, PRECONDITION, the tensors\' dtypes)', '']
    for key, cfg in getattr(tuner, 'cache', {}).items():
        lines.append(f"- {key[:9]}: {cfg}")
    timings = getattr(tuner, 'configs_timings', None) or {}
    for cfg, t in timings.items():
        lines.append(f"  - last tuned key, {cfg}: {t}")
    try:
        jit = tuner.fn
        for dev_cache in jit.device_caches.values():
            for kern in dev_cache[0].values():
                kern._init_handles()
                lines.append(f"- compiled: num_warps {kern.metadata.num_warps}, regs {kern.n_regs}, spills {kern.n_spills}, "
                             f"shared {kern.metadata.shared}")
    except Exception as e:  # diagnostics only
        lines.append(f"- (registers unavailable: {type(e).__name__}: {e})")
    lines.append('')


def warm_start_study(lines, T=256, H=32, K=128, tol=1e-4, max_steps=100):
    """Iterations to `tol` (float64 PCG, the project's solver) from the Jacobi start vs warm starts."""

    def pcg(A, b, d, x0):
        s = b.norm(dim=-1, keepdim=True)
        b, x = b / s, x0 / s
        r = b - (A @ x[..., None])[..., 0]
        z = r / d
        p, rz = z, (r * z).sum(-1, keepdim=True)
        active = ((r * r).sum(-1, keepdim=True) > tol ** 2) & (rz > 0)
        steps = torch.zeros_like(s, dtype=torch.int32)
        for _ in range(max_steps):
            if not active.any():
                break
            w = (A @ p[..., None])[..., 0]
            alpha = torch.where(active, rz / (p * w).sum(-1, keepdim=True), torch.zeros_like(rz))
            x, r = x + alpha * p, r - alpha * w
            z = r / d
            rz_new = (r * z).sum(-1, keepdim=True)
            p = z + torch.where(active, rz_new / rz, torch.zeros_like(rz)) * p
            rz = torch.where(active, rz_new, rz)
            steps += active.int()
            active = active & ((r * r).sum(-1, keepdim=True) > tol ** 2) & (rz > 0)
        return x * s, steps[..., 0].double()

    def run(keys, gate, rho, seed=0):
        torch.manual_seed(seed)
        f64 = dict(dtype=torch.float64)
        sc = torch.ones(K, **f64) if keys == 'isotropic' else torch.logspace(-1, 0.5, K, **f64)
        k = F.normalize(torch.randn(T, H, K, **f64) * sc, dim=-1)
        # queries with lag-1 correlation rho (an AR(1) process before the normalisation)
        e = torch.randn(T, H, K, **f64)
        qs = [e[0]]
        for t in range(1, T):
            qs.append(rho * qs[-1] + (1 - rho ** 2) ** 0.5 * e[t])
        q = F.normalize(torch.stack(qs) * sc, dim=-1)
        g = F.logsigmoid(torch.randn(T, H, **f64) * gate[1] + gate[0])
        beta = torch.rand(T, H, **f64)
        lamb = 0.25 + F.softplus(torch.randn(H, K, **f64))
        Hs, x_prev = torch.zeros(H, K, K, **f64), None
        res = {n: [] for n in ('jacobi', 'warm', 'scaled', 'best')}
        for t in range(T):
            Hs = g[t].exp()[:, None, None] * Hs + beta[t][:, None, None] * k[t][:, :, None] * k[t][:, None, :]
            A = Hs + torch.diag_embed(lamb)
            d, b = torch.diagonal(A, dim1=-2, dim2=-1), q[t]
            x, n_j = pcg(A, b, d, b / d)
            if t >= 16:
                res['jacobi'].append(n_j.mean())
                res['warm'].append(pcg(A, b, d, x_prev)[1].mean())
                # the best multiple of x_prev (in the A-norm) costs one more matvec
                Ax = (A @ x_prev[..., None])[..., 0]
                c = (x_prev * b).sum(-1, keepdim=True) / (x_prev * Ax).sum(-1, keepdim=True)
                n_s = pcg(A, b, d, c * x_prev)[1]
                res['scaled'].append(n_s.mean() + 1)
                # per row, the start with the smaller residual (one more matvec)
                r_j = (b - (A @ (b / d)[..., None])[..., 0]).norm(dim=-1)
                r_s = (b - c * Ax).norm(dim=-1)
                res['best'].append(torch.where(r_s < r_j, n_s, n_j).mean() + 1)
            x_prev = x
        return [torch.stack(v).mean().item() for v in res.values()]

    lines += [
        f'## Warm start: mean CG iterations to cg_tol = {tol} (float64, Jacobi PCG, T = {T}, H = {H}, K = {K})', '',
        'Keys unit-norm (anisotropic: coordinate scales over 1.5 decades); g = logsigmoid(N(mu, sigma)); beta ~ U(0, 1);',
        'Λ = 0.25 + softplus(N(0, 1)); queries an AR(1) sequence with the given lag-1 correlation, then normalised.',
        'The two last columns include the extra matvec (+1) that picking the scale or the start costs.', '',
        '| keys | gate (mu, sigma) | q lag-1 corr | Jacobi start b/diag | warm: x_{t-1} '
        '| warm: c·x_{t-1}, best c (+1) | better of the two starts (+1) |',
        '|---|---|---|---|---|---|---|',
    ]
    for keys in ('isotropic', 'anisotropic'):
        for gate in ((3.0, 1.0), (6.0, 1.0)):
            for rho in (0.0, 0.5, 0.9, 0.99):
                r = run(keys, gate, rho)
                lines.append(f"| {keys} | {gate} | {rho} | " + ' | '.join(f"{x:.2f}" for x in r) + ' |')
                print(lines[-1], flush=True)
    lines.append('')


def header():
    from benchmark_chunk import header as versions
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
    return [f'# fused_recurrent_mesa decoding on {dev}', '', versions(), '']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=None, help='write the markdown report here')
    parser.add_argument('--warm-start-study', action='store_true', help='run the CPU warm-start study instead')
    parser.add_argument('--skip-correctness', action='store_true')
    args = parser.parse_args()
    lines = header()
    if args.warm_start_study:
        warm_start_study(lines)
    else:
        if not args.skip_correctness:
            correctness(lines)
            print('\n'.join(lines), flush=True)
            if args.out:
                with open(args.out, 'w') as f:
                    f.write('\n'.join(lines) + '\n')
        timing(lines)
    text = '\n'.join(lines)
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
