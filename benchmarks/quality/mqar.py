# Copyright (c) 2026, fla-mesa contributors. MIT license.
r"""
Multi-query associative recall (MQAR) in Zoology's protocol (Arora et al., 2023): each sequence of `--seq-len`
tokens opens with N key-value pairs (keys from the lower half of the `--vocab-size` tokens, values from the upper
half, all distinct), then asks for every key again at positions drawn with Zoology's power-law gaps, the rest filled
with random tokens; the model must predict each asked key's value. Accuracy is counted on the query positions only.

As in Zoology, a model trains on a mixture: short sequences with few pairs first in the cycle and most often
(`--curriculum`, after Zoology's training set: 64 tokens with 4 pairs, 128 with 8, 256 with 16; they get small
models off the loss plateau), then every tested pair count at `--seq-len`. It is tested on each pair count at
`--seq-len`; every (model, width, learning rate, seed) run is one cached cell (JSON under `--cache-dir`), so a run
cut by a time limit resumes where it stopped. A (model, width, pairs) entry of the table is the best learning rate's mean
over the seeds; a third seed runs where the first two disagree by more than `--disagree` points.
Output: `benchmarks/results/mqar_<tag>.md` (tables) and `mqar_<tag>.png` (accuracy against pairs, one panel a width).

    python benchmarks/quality/mqar.py --quick              # H200: about 5 minutes, a first signal
    python benchmarks/quality/mqar.py                      # the full grid (resumes; --time-limit for a cut run)
    python benchmarks/quality/mqar.py --device cpu --tiny  # CPU smoke test, end to end at a tiny size
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

RESULTS = os.path.join(HERE, '..', 'results')

# Zoology's easy training sequences (tokens:pairs:weight); the weight is the steps per cycle
CURRICULUM = ['64:4:4', '128:8:2', '256:16:1']

PRESETS = {
    # the grid
    'full': dict(widths=[64, 128, 256], pairs=[32, 64, 128], lrs=[1e-3, 3e-3, 1e-2], seeds=[0, 1], steps=3000,
                 batch_size=64, vocab_size=8192, seq_len=512, models=list(common.MODELS), parallel=12),
    # a first signal in a few minutes: two widths, two pair counts, one learning rate, one seed
    'quick': dict(widths=[64, 128], pairs=[32, 64], lrs=[3e-3], seeds=[0], steps=3000, batch_size=64,
                  vocab_size=8192, seq_len=512, models=list(common.MODELS), parallel=12),
    # CPU smoke test: every code path at a size two shared cores run in a minute or two
    'tiny': dict(widths=[32], pairs=[4, 8], lrs=[3e-3], seeds=[0], steps=2, batch_size=2, vocab_size=64,
                 seq_len=64, models=list(common.MODELS), parallel=2, curriculum=['16:2:1']),
}


def mqar_batch(batch_size, num_pairs, seq_len, vocab_size, generator, device, power_a=0.01):
    """
    Zoology's MQAR: `k1 v1 ... kN vN`, then the N keys again at query positions `2N + 2 g` with distinct gaps g
    drawn with probability ∝ g^(a−1), random tokens elsewhere. Labels: the value at each query position, -100
    elsewhere (the model predicts the value from the key's position; the value is never in the input there).
    """
    if 4 * num_pairs > seq_len:
        raise ValueError(f'num_pairs ({num_pairs}) must be at most seq_len / 4 ({seq_len // 4})')
    if vocab_size // 2 <= num_pairs:
        raise ValueError(f'vocab_size ({vocab_size}) too small for {num_pairs} distinct keys')
    B, N, half = batch_size, num_pairs, vocab_size // 2
    opts = dict(generator=generator, device=device)
    keys = 1 + torch.rand(B, half - 1, **opts).argsort(dim=1)[:, :N]
    values = half + torch.rand(B, vocab_size - half, **opts).argsort(dim=1)[:, :N]
    space = (seq_len - 2 * N) // 2
    p = power_a * torch.arange(1, space + 1, device=device, dtype=torch.float) ** (power_a - 1)
    gaps = torch.multinomial(p.expand(B, space).contiguous(), N, replacement=False, generator=generator)
    inputs = torch.randint(0, vocab_size, (B, seq_len), **opts)
    inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2] = keys, values
    where = 2 * N + 2 * gaps
    inputs.scatter_(1, where, keys)
    labels = torch.full_like(inputs, -100).scatter_(1, where, values)
    return inputs, labels


def training_schedule(curriculum, pairs, seq_len):
    """
    One cycle of (sequence length, pairs) per step: each `tokens:pairs:weight` of `curriculum` `weight` times, then
    every pair count of `pairs` at `seq_len` once. A ValueError names a malformed or impossible entry.
    """
    schedule = []
    for entry in curriculum:
        parts = entry.split(':')
        if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
            raise ValueError(f'curriculum entries are tokens:pairs:weight (positive integers), got {entry!r}')
        length, n, weight = map(int, parts)
        if 4 * n > length:
            raise ValueError(f'curriculum entry {entry!r}: pairs ({n}) must be at most tokens / 4 ({length // 4})')
        schedule += [(length, n)] * weight
    return schedule + [(seq_len, n) for n in pairs]


def query_loss_and_hits(model, inputs, labels):
    h = common.final_hidden(model, inputs)
    mask = labels != -100
    logits = model.lm_head(h[mask]).float()
    target = labels[mask]
    return torch.nn.functional.cross_entropy(logits, target), (logits.argmax(-1) == target).sum(), target.numel()


def query_loss(model, inputs, labels):
    return query_loss_and_hits(model, inputs, labels)[0]


def train_cell(cell):
    """Trains one (model, width, lr, seed) cell and returns its record."""
    device = torch.device(cell['device'])
    on_gpu = device.type == 'cuda'
    torch.set_num_threads(cell['threads'])
    torch.manual_seed(cell['seed'])
    with device:
        model = common.build_model(
            cell['model'], vocab_size=cell['vocab_size'], hidden_size=cell['width'], num_layers=cell['num_layers'],
            head_dim=cell['head_dim'], intermediate_size=cell['intermediate_size'], max_len=cell['seq_len'],
            on_gpu=on_gpu, mesa_config=cell.get('mesa_config'),
        )
    params = sum(p.numel() for p in model.parameters())
    warmup = max(1, cell['steps'] // 10)
    opt, sched = common.make_optimizer(model, cell['lr'], cell['steps'], warmup)
    health = common.Health()
    data = torch.Generator(device).manual_seed(cell['seed'])
    pairs, amp = cell['pairs'], cell['amp']
    schedule = training_schedule(cell['curriculum'], pairs, cell['seq_len'])
    log_every = max(1, cell['steps'] // 20)
    start, losses, train_cg = time.time(), [], common.cg_histogram()
    # steady-state time from a tenth of the way in: the first steps compile and autotune Triton kernels
    steady_from, steady_start = cell['steps'] // 10, None
    model.train()
    for step in range(cell['steps']):
        if step == steady_from:
            steady_start = time.time()
        length, n = schedule[step % len(schedule)]
        inputs, labels = mqar_batch(cell['batch_size'], n, length, cell['vocab_size'], data, device)
        loss = common.training_step(model, opt, sched, health, step, query_loss, (inputs, labels), amp)
        losses.append(loss)
        common.accumulate_cg(model, train_cg)
        if (step + 1) % log_every == 0:
            # the cell's log: where a model leaves the loss plateau, and how fast it trains
            recent = losses[-log_every:]
            print(f'step {step + 1} loss {sum(recent) / len(recent):.4f} ({time.time() - start:.0f} s)', flush=True)
    train_seconds = time.time() - start
    seconds_per_step = (time.time() - steady_start) / (cell['steps'] - steady_from)
    model.eval()
    accuracy, eval_cg = {}, {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for n in pairs:
            # the same test set for every model and seed
            gen = torch.Generator(device).manual_seed(10_000 + n)
            hits = total = 0
            cg = common.cg_histogram()
            for _ in range(cell['eval_batches']):
                inputs, labels = mqar_batch(cell['batch_size'], n, cell['seq_len'], cell['vocab_size'], gen, device)
                _, h, t = query_loss_and_hits(model, inputs, labels)
                hits, total = hits + h.item(), total + t
                common.accumulate_cg(model, cg)
            accuracy[str(n)] = hits / total
            if common.cg_quantiles(cg):
                eval_cg[str(n)] = common.cg_quantiles(cg)
    tail = losses[-max(1, len(losses) // 10):]
    return dict(
        status='ok', accuracy=accuracy, params=params, final_train_loss=sum(tail) / len(tail),
        train_seconds=train_seconds, seconds_per_step=seconds_per_step,
        cg_steps_train=common.cg_quantiles(train_cg), cg_steps_eval=eval_cg or None,
        health=health.summary(),
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--quick', action='store_true', help='the quick preset (about 5 minutes on an H200)')
    p.add_argument('--tiny', action='store_true', help='the tiny preset (CPU smoke test)')
    p.add_argument('--models', nargs='+', choices=common.MODELS)
    p.add_argument('--widths', nargs='+', type=int)
    p.add_argument('--pairs', nargs='+', type=int)
    p.add_argument('--lrs', nargs='+', type=float)
    p.add_argument('--seeds', nargs='+', type=int)
    p.add_argument('--steps', type=int)
    p.add_argument('--batch-size', type=int)
    p.add_argument('--vocab-size', type=int)
    p.add_argument('--seq-len', type=int)
    p.add_argument('--curriculum', nargs='*', help='easy training sequences, tokens:pairs:weight each '
                   f'(default {" ".join(CURRICULUM)}; none: train at --seq-len only)')
    p.add_argument('--num-layers', type=int, default=2)
    p.add_argument('--head-dim', type=int, default=None, help='key dimension per head (default 64; tiny 16)')
    p.add_argument('--eval-batches', type=int, default=None,
                   help='test batches per pair count (default 48, about Zoology\'s 3000 sequences; quick 16; tiny 1)')
    p.add_argument('--parallel', type=int, help='training processes at once (spread over the visible GPUs)')
    p.add_argument('--disagree', type=float, default=10.0,
                   help='points between two seeds that add a third seed for that model and width')
    p.add_argument('--no-amp', action='store_true', help='float32 instead of bf16 autocast')
    common.add_kernel_options(p)
    common.add_model_options(p)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--cache-dir', default=os.path.join(RESULTS, 'quality_cache', 'mqar'))
    p.add_argument('--tag', help='output name: benchmarks/results/mqar_<tag>.md/.png (default: the preset)')
    p.add_argument('--time-limit', type=float, help='seconds after which no new cell starts (for a cut run)')
    p.add_argument('--cell-timeout', type=float, default=1200, help='seconds after which a cell is killed (failed)')
    p.add_argument('--retry-failed', action='store_true', help='run again cells cached as failed (not refused)')
    p.add_argument('--report-only', action='store_true',
                   help='write the report from the cached cells, training none (missing cells: not yet run)')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = 'tiny' if args.tiny else 'quick' if args.quick else 'full'
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = preset
    args.tag = args.tag or preset
    if args.curriculum is None:
        args.curriculum = CURRICULUM
    training_schedule(args.curriculum, args.pairs, args.seq_len)  # a bad entry fails here, not in every worker
    if args.head_dim is None:
        args.head_dim = 16 if args.tiny else 64
    if args.eval_batches is None:
        args.eval_batches = {'tiny': 1, 'quick': 16, 'full': 48}[preset]
    return args


def cell_dir(args):
    """Settings that change every cell's result name the cache folder, so a changed setting never reuses a cell."""
    settings = dict(steps=args.steps, batch_size=args.batch_size, vocab_size=args.vocab_size, seq_len=args.seq_len,
                    num_layers=args.num_layers, head_dim=args.head_dim, pairs=args.pairs, curriculum=args.curriculum,
                    eval_batches=args.eval_batches, amp=not args.no_amp, device=args.device)
    settings.update(common.model_settings(args))
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(args.cache_dir, f'{args.preset}-{digest}'), settings


def make_jobs(args, folder, settings, sizes, cells):
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    jobs = []
    for model, width, lr, seed in cells:
        key = f'{model}_w{width}_lr{lr:g}_s{seed}'
        result = os.path.join(folder, key + '.json')
        record = common.read_json(result)
        if record is not None and (record['status'] != 'failed' or not args.retry_failed):
            continue
        cell = dict(settings, autotune=args.autotune, fla_config_share=args.fla_config_share, model=model, width=width,
                    lr=lr, seed=seed, threads=threads, result=result,
                    intermediate_size=sizes[width][model]['intermediate_size'])
        jobs.append(dict(key=key, result=result, log=os.path.join(folder, 'logs', key + '.log'),
                         env=common.worker_env(model, args.device),
                         argv=[sys.executable, os.path.abspath(__file__), '--worker', json.dumps(cell)]))
    return jobs


def load(folder, cells):
    return {cell: common.read_json(os.path.join(folder, f'{cell[0]}_w{cell[1]}_lr{cell[2]:g}_s{cell[3]}.json'))
            for cell in cells}


def disagreeing(args, records):
    """(model, width) whose first two seeds' best accuracies differ by more than `--disagree` points somewhere."""
    out = []
    for model in args.models:
        for width in args.widths:
            for n in args.pairs:
                best = []
                for seed in args.seeds[:2]:
                    accs = [r['accuracy'][str(n)] for (m, w, _, s), r in records.items()
                            if (m, w, s) == (model, width, seed) and r and r['status'] == 'ok']
                    best.append(max(accs) if accs else None)
                if len(best) == 2 and None not in best and abs(best[0] - best[1]) * 100 > args.disagree:
                    out.append((model, width))
                    break
    return out


def summarise(args, records, sizes):
    """table[model][width][pairs] = (mean accuracy over seeds at the best lr, per-seed accuracies, lr)."""
    table = {}
    for model in args.models:
        for width in args.widths:
            for n in args.pairs:
                best = None
                for lr in args.lrs:
                    accs = [r['accuracy'][str(n)] for key, r in records.items()
                            if key[:3] == (model, width, lr) and r and r['status'] == 'ok']
                    if accs and (best is None or sum(accs) / len(accs) > best[0]):
                        best = (sum(accs) / len(accs), accs, lr)
                table.setdefault(model, {}).setdefault(width, {})[n] = best
    return table


LINEAR = ('gla', 'fla_mesa_net', 'deltanet', 'gated_deltanet')


def targets(args, table):
    """
    Issue 15's MQAR targets, from the table: MesaNet against the best linear baseline that trained, cell by cell
    (target: never below, +5 points on average), and against the Transformer at the largest width (within 5).
    """
    if 'mesa' not in args.models:
        return ['MesaNet was not run.']
    margins, behind = [], []
    for w in args.widths:
        for n in args.pairs:
            mesa = table['mesa'][w][n]
            others = [table[m][w][n][0] for m in LINEAR if m in args.models and table[m][w][n] is not None]
            if mesa is not None and others:
                margins.append(100 * (mesa[0] - max(others)))
                if margins[-1] < 0:
                    behind.append(f'w{w} p{n}')
    lines = []
    if margins:
        lines.append(f'- MesaNet minus the best linear baseline: {sum(margins) / len(margins):+.1f} points on average '
                     f'over {len(margins)} cells (least {min(margins):+.1f}); behind in: {", ".join(behind) or "none"}.')
    w = max(args.widths)
    gaps = [100 * (table['transformer'][w][n][0] - table['mesa'][w][n][0]) for n in args.pairs
            if 'transformer' in args.models and table['transformer'][w][n] and table['mesa'][w][n]]
    if gaps:
        lines.append(f'- Transformer minus MesaNet at width {w}: ' + ', '.join(f'{g:+.1f}' for g in gaps) + ' points.')
    return lines or ['Not enough cells trained to compare.']


def write_report(args, records, table, sizes, folder):
    os.makedirs(RESULTS, exist_ok=True)
    ok = [r for r in records.values() if r and r['status'] == 'ok']
    env = next((r['environment'] for r in records.values() if r and 'environment' in r), common.environment())
    lines = [
        f'# MQAR ({args.preset} preset)', '',
        f'Zoology protocol: vocabulary {args.vocab_size}, sequence length {args.seq_len}, {args.num_layers} layers, '
        f'head dim {args.head_dim}; trained on a cycle of {" ".join(args.curriculum) or "no"} easy sequences '
        f'(tokens:pairs:steps) and {args.pairs} pairs at length {args.seq_len}, {args.steps} steps of batch '
        f'{args.batch_size}, learning rates {args.lrs}, seeds {args.seeds} (a third where two disagree by '
        f'> {args.disagree:g} points), bf16 autocast: {not args.no_amp}. Accuracy on the query positions of '
        f'{args.eval_batches * args.batch_size} test sequences per pair count; each entry is the best learning '
        'rate\'s mean over seeds (per-seed values and the rate in brackets).', '',
        f'Environment: {json.dumps(env)}; device `{args.device}`. Cache: `{os.path.relpath(folder, RESULTS)}`.', '',
    ]
    lines += common.model_report_lines(args)
    header = '| model | ' + ' | '.join(f'w{w} p{n}' for w in args.widths for n in args.pairs) + ' |'
    lines += [header, '|' + '---|' * (1 + len(args.widths) * len(args.pairs))]
    for model in args.models:
        cells = []
        for w in args.widths:
            for n in args.pairs:
                entry = table[model][w][n]
                if entry is None:
                    statuses = {r['status'] for (m, ww, _, _), r in records.items() if (m, ww) == (model, w) and r}
                    cells.append(' / '.join(sorted(statuses)) or 'not run')
                else:
                    cells.append(f'{100 * entry[0]:.1f} ({", ".join(f"{100 * a:.0f}" for a in entry[1])}; '
                                 f'lr {entry[2]:g})')
        lines.append(f'| {common.LABELS[model]} | ' + ' | '.join(cells) + ' |')
    lines += ['', '## Parameters, time, CG steps and training health', '',
              '| model | width | params | s/step (mean, after the first tenth) | CG steps train mean / p99 | '
              'CG steps test mean / p99 (largest pairs) | non-finite loss / grad | max grad norm | max grad spike |',
              '|---|---|---|---|---|---|---|---|---|']
    for model in args.models:
        for w in args.widths:
            rs = [r for (m, ww, _, _), r in records.items() if (m, ww) == (model, w) and r and r['status'] == 'ok']
            if not rs:
                continue
            cg_train = [r['cg_steps_train'] for r in rs if r['cg_steps_train']]
            cg_eval = [r['cg_steps_eval'][str(args.pairs[-1])] for r in rs if r['cg_steps_eval']]
            h = [r['health'] for r in rs]
            lines.append(
                f'| {common.LABELS[model]} | {w} | {rs[0]["params"]:,} (target {sizes[w][model]["target"]:,}) | '
                f'{sum(r["seconds_per_step"] for r in rs) / len(rs):.3f} | '
                + (f'{sum(c["mean"] for c in cg_train) / len(cg_train):.1f} / {max(c["p99"] for c in cg_train)}'
                   if cg_train else '-') + ' | '
                + (f'{sum(c["mean"] for c in cg_eval) / len(cg_eval):.1f} / {max(c["p99"] for c in cg_eval):.0f}'
                   if cg_eval else '-') + ' | '
                f'{sum(x["nonfinite_loss"] for x in h)} / {sum(x["nonfinite_grad"] for x in h)} | '
                f'{max(x["max_grad_norm"] for x in h):.3g} | {max(x["max_grad_spike"] for x in h):.3g} |')
    bad = {(k, r['status'], r['error'].splitlines()[0][:300]) for k, r in records.items()
           if r and r['status'] != 'ok'}
    if bad:
        lines += ['', '## Cells that did not train', '']
        # one line per model and reason (a refusal repeats for every cell)
        groups = {}
        for k, status, err in sorted(bad):
            groups.setdefault((k[0], status, err), []).append(f'w{k[1]} lr {k[2]:g} seed {k[3]}')
        lines += [f'- {model} ({len(cells)} cells: {", ".join(cells)}): **{status}**: {err}'
                  for (model, status, err), cells in groups.items()]
    lines += ['', '## Against the targets', ''] + targets(args, table)
    missing = [k for k, r in records.items() if r is None]
    if missing:
        lines += ['', f'{len(missing)} cells not yet run (run the same command again to resume): '
                  + ', '.join(f'{k[0]} w{k[1]} lr {k[2]:g} seed {k[3]}' for k in missing) + '.']
    lines += ['', f'{len(ok)} cells trained, {sum(r["train_seconds"] for r in ok) / 60:.1f} process-minutes of '
              'training in all (processes share the device).']
    path = os.path.join(RESULTS, f'mqar_{args.tag}.md')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot(args, table, os.path.join(RESULTS, f'mqar_{args.tag}.png'))
    return path


def plot(args, table, path):
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no plot (pip install matplotlib)')
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.widths), figsize=(4.2 * len(args.widths), 3.6), sharey=True, squeeze=False)
    # one colour per model in every panel, and one legend of every model that has a point anywhere
    colours = {m: f'C{i}' for i, m in enumerate(common.MODELS)}
    handles = {}
    for ax, w in zip(axes[0], args.widths):
        for model in args.models:
            points = [(n, 100 * table[model][w][n][0]) for n in args.pairs if table[model][w][n] is not None]
            if points:
                handles[model], = ax.plot(*zip(*points), marker='o', color=colours[model], label=common.LABELS[model])
        ax.set_title(f'width {w}')
        ax.set_xlabel('key-value pairs')
        ax.set_xscale('log', base=2)
        ax.set_xticks(args.pairs, [str(n) for n in args.pairs])
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('accuracy on queries (%)')
    if handles:
        axes[0][-1].legend([handles[m] for m in args.models if m in handles],
                           [common.LABELS[m] for m in args.models if m in handles], fontsize=7)
    fig.suptitle(f'MQAR, seq len {args.seq_len}, vocab {args.vocab_size}, {args.num_layers} layers ({args.preset})')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return common.run_worker(args.worker, train_cell)
    folder, settings = cell_dir(args)
    settings['amp'] = not args.no_amp
    sizes = {w: common.matched_sizes(args.models, vocab_size=args.vocab_size, hidden_size=w,
                                     num_layers=args.num_layers, head_dim=args.head_dim, max_len=args.seq_len,
                                     mesa_config=args.mesa_config)
             for w in args.widths}
    for w, s in sizes.items():
        print(f'width {w}: ' + ', '.join(f'{m} {v["params"]:,} (MLP {v["intermediate_size"]})' for m, v in s.items())
              + f'; target {next(iter(s.values()))["target"]:,} (±5%)')
    # a cut run has every seed of the first learning rates; the widest (slowest) cells start first
    cells = [(m, w, lr, s) for lr in args.lrs for s in args.seeds for w in sorted(args.widths, reverse=True)
             for m in args.models]
    start = time.time()
    left = [] if args.report_only else common.run_jobs(
        make_jobs(args, folder, settings, sizes, cells), args.parallel, 'MQAR cells', args.time_limit, args.cell_timeout,
        common.visible_gpus(args.device))
    records = load(folder, cells)
    if not left and len(args.seeds) >= 2:
        third = max(args.seeds) + 1
        extra = [(m, w, lr, third) for m, w in disagreeing(args, records) for lr in args.lrs]
        if args.report_only:
            cells += [cell for cell, record in load(folder, extra).items() if record is not None]
            records = load(folder, cells)
        elif extra:
            print(f'seeds disagree by > {args.disagree:g} points for {sorted(set(e[:2] for e in extra))}: seed {third}')
            remaining = None if args.time_limit is None else max(0.0, args.time_limit - (time.time() - start))
            common.run_jobs(make_jobs(args, folder, settings, sizes, extra), args.parallel, 'third seeds', remaining,
                            args.cell_timeout, common.visible_gpus(args.device))
            cells += extra
            records = load(folder, cells)
    path = write_report(args, records, summarise(args, records, sizes), sizes, folder)
    with open(path) as f:
        print(f.read())
    print(f'report: {path}')


if __name__ == '__main__':
    main()
