# Copyright (c) 2026, fla-mesa contributors. MIT license.
r"""
Byte-level language models (vocabulary 256) on the corpus of `byte_corpus.py` (Python's standard library and the
installed packages' text, split by file): MesaNet against GLA (the same model with `use_solver=False`), DeltaNet,
gated DeltaNet and a Transformer, with the same width, depth, heads, parameter count (±5%, the MLP's width
matched), tokens, optimiser and schedule, at T = 2048 in bf16 autocast. Every model and seed trains in a process
of its own (`--parallel` at once on one GPU) and its result is cached as JSON; a run stopped by `--time-limit`
saves a checkpoint (in `--checkpoint-dir`, on the same machine) and resumes from it the next time.

Reported per run: validation bits per byte; a recall probe on the validation files (bits per byte on the second
occurrence of a line repeated within the 2048-byte window against its first occurrence: a model that recalls
copies the second); the CG steps the solver took (mean, 99th percentile; training and validation); training
health (non-finite losses and gradients, which skip their step; the largest gradient norm and the largest ratio of
a step's gradient norm to the median of the previous 100).

    python benchmarks/quality/byte_lm.py --quick               # H200: a few minutes, a first signal
    python benchmarks/quality/byte_lm.py --time-limit 540      # the full runs, resumable in 10-minute pieces
    python benchmarks/quality/byte_lm.py --device cpu --tiny   # CPU smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import byte_corpus  # noqa: E402
import common  # noqa: E402

RESULTS = os.path.join(HERE, '..', 'results')

PRESETS = {
    'full': dict(models=['mesa', 'gla', 'deltanet', 'gated_deltanet', 'transformer'], seeds=[0, 1], width=512,
                 num_layers=12, head_dim=128, seq_len=2048, batch_size=16, steps=1000, lr=1e-3, val_windows=512,
                 parallel=5),
    'quick': dict(models=list(common.MODELS), seeds=[0], width=256, num_layers=4, head_dim=128, seq_len=2048,
                  batch_size=8, steps=300, lr=2e-3, val_windows=128, parallel=6),
    'tiny': dict(models=list(common.MODELS), seeds=[0], width=32, num_layers=2, head_dim=16, seq_len=128,
                 batch_size=2, steps=2, lr=2e-3, val_windows=4, parallel=2),
}


def corpus_settings(args):
    if args.tiny:
        # two small stdlib packages: the smoke test must not read all of site-packages
        stdlib = sysconfig.get_paths()['stdlib']
        return dict(roots=[os.path.join(stdlib, 'json'), os.path.join(stdlib, 'email')], val_permille=200,
                    max_train_bytes=1 << 20, max_val_bytes=256 << 10)
    return dict(roots=None, val_permille=20, max_train_bytes=256 << 20, max_val_bytes=4 << 20)


def repeat_masks(windows, min_len=20):
    """
    Target masks `[N, T]` (target j is byte j + 1 of a window) over the first and the second occurrence of every
    line that occurs twice or more whole within a window: the line's bytes after leading whitespace, from the third
    byte on (the first two say which line it is), for lines of `min_len` bytes or more with 8 or more distinct bytes
    (no rules of dashes), and the number of such lines.
    """
    n, t = windows.shape[0], windows.shape[1] - 1
    first, second, count = np.zeros((n, t), bool), np.zeros((n, t), bool), 0
    for i, window in enumerate(windows):
        seen, pos = {}, 0
        lines = window.tobytes().split(b'\n')
        for line in lines[:-1]:     # the last piece may be cut by the window's end
            start, pos = pos, pos + len(line) + 1
            content = line.lstrip()
            if start == 0 or len(content) < min_len or len(set(content)) < 8 or b'\x00' in line:
                continue            # the first piece may be cut by the window's start
            begin = start + len(line) - len(content)
            if content not in seen:
                seen[content] = begin
            elif seen[content] is not None:
                for mask, b in ((first, seen[content]), (second, begin)):
                    mask[i, b + 1:b + len(content) - 1] = True
                seen[content], count = None, count + 1
    return torch.from_numpy(first), torch.from_numpy(second), count


def byte_loss(model, x, y):
    """Per-byte cross-entropy in nats `[B, T]`."""
    logits = model.lm_head(common.final_hidden(model, x)).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction='none').view_as(y)


def mean_byte_loss(model, x, y):
    return byte_loss(model, x, y).mean()


def train_batch(data, seed, step, batch_size, seq_len):
    """The same windows for every model at a given seed and step (and after a resume)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    offsets = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen).tolist()
    chunk = torch.from_numpy(np.stack([data[o:o + seq_len + 1] for o in offsets]).astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model, cell, val, device, amp):
    model.eval()
    t, n = cell['seq_len'], min(cell['val_windows'], (len(val) - 1) // cell['seq_len'])
    windows = np.stack([val[i * t:i * t + t + 1] for i in range(n)])
    first, second, lines = repeat_masks(windows)
    data = torch.from_numpy(windows.astype(np.int64))
    losses, hist = [], common.cg_histogram()
    for i in range(0, n, cell['batch_size']):
        chunk = data[i:i + cell['batch_size']].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses.append(byte_loss(model, chunk[:, :-1], chunk[:, 1:]).cpu())
        common.accumulate_cg(model, hist)
    loss = torch.cat(losses) / math.log(2)
    model.train()
    return dict(
        val_bpb=loss.mean().item(), val_bytes=loss.numel(),
        probe=dict(lines=lines, bytes=int(second.sum()),
                   bpb_first=loss[first].mean().item() if first.any() else None,
                   bpb_second=loss[second].mean().item() if second.any() else None),
        cg_steps_eval=common.cg_quantiles(hist),
    )


def train_run(cell):
    device = torch.device(cell['device'])
    torch.set_num_threads(cell['threads'])
    torch.manual_seed(cell['seed'])
    train = np.memmap(os.path.join(cell['corpus'], 'train.bin'), dtype=np.uint8, mode='r')
    val = np.memmap(os.path.join(cell['corpus'], 'val.bin'), dtype=np.uint8, mode='r')
    with device:
        model = common.build_model(
            cell['model'], vocab_size=256, hidden_size=cell['width'], num_layers=cell['num_layers'],
            head_dim=cell['head_dim'], intermediate_size=cell['intermediate_size'], max_len=cell['seq_len'],
            on_gpu=device.type == 'cuda', mesa_config=cell.get('mesa_config'),
        )
    opt, sched = common.make_optimizer(model, cell['lr'], cell['steps'], max(1, cell['steps'] // 20))
    health, hist, curve, step, seconds = common.Health(), common.cg_histogram(), [], 0, 0.0
    ckpt = os.path.join(cell['checkpoint_dir'], os.path.basename(cell['result']) + '.ckpt.pt')
    os.makedirs(cell['checkpoint_dir'], exist_ok=True)
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state['model'])
        opt.load_state_dict(state['opt'])
        sched.load_state_dict(state['sched'])
        health.load_state_dict(state['health'])
        # the histogram stays on the CPU (map_location moved it to the device)
        hist, curve, step, seconds = state['hist'].cpu(), state['curve'], state['step'], state['seconds']
        print(f'resumed at step {step}', flush=True)

    def save():
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), hist=hist,
                        health=health.state_dict(), curve=curve, step=step, seconds=seconds), ckpt + '.tmp')
        os.replace(ckpt + '.tmp', ckpt)

    model.train()
    start, last_save, window = time.time(), time.time(), []
    # steady-state speed after a tenth of this process's steps: the first ones compile and autotune Triton kernels
    steady_from, steady_start = step + (cell['steps'] - step) // 10, time.time()
    while step < cell['steps']:
        if time.time() > cell['deadline']:
            if step:
                seconds += time.time() - start
                save()
            print(f'paused at step {step}', flush=True)
            sys.exit(common.PAUSED)
        if step == steady_from:
            steady_start = time.time()
        x, y = (a.to(device, non_blocking=True) for a in train_batch(train, cell['seed'], step, cell['batch_size'],
                                                                     cell['seq_len']))
        loss = common.training_step(model, opt, sched, health, step, mean_byte_loss, (x, y), cell['amp'])
        common.accumulate_cg(model, hist)
        window.append(loss)
        step += 1
        if step % 50 == 0 or step == cell['steps']:
            curve.append((step, sum(window) / len(window) / math.log(2)))
            window = []
            print(f'step {step} train bpb {curve[-1][1]:.4f} ({seconds + time.time() - start:.0f} s)', flush=True)
        if time.time() - last_save > cell['checkpoint_seconds']:
            seconds, start = seconds + time.time() - start, time.time()
            save()
            last_save = time.time()
    seconds += time.time() - start
    steady_tps = (step - steady_from) * cell['batch_size'] * cell['seq_len'] / max(time.time() - steady_start, 1e-9)
    record = dict(status='ok', params=sum(p.numel() for p in model.parameters()), steps=step,
                  tokens=step * cell['batch_size'] * cell['seq_len'], train_seconds=seconds,
                  tokens_per_second=steady_tps,
                  curve=curve, cg_steps_train=common.cg_quantiles(hist), health=health.summary())
    record.update(evaluate(model, cell, val, device, cell['amp']))
    if os.path.exists(ckpt):
        os.remove(ckpt)
    return record


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--quick', action='store_true', help='the quick preset (a few minutes on an H200)')
    p.add_argument('--tiny', action='store_true', help='the tiny preset (CPU smoke test)')
    p.add_argument('--models', nargs='+', choices=common.MODELS)
    p.add_argument('--seeds', nargs='+', type=int)
    p.add_argument('--width', type=int)
    p.add_argument('--num-layers', type=int)
    p.add_argument('--head-dim', type=int)
    p.add_argument('--seq-len', type=int)
    p.add_argument('--batch-size', type=int)
    p.add_argument('--steps', type=int)
    p.add_argument('--lr', type=float)
    p.add_argument('--val-windows', type=int, help='validation windows of seq-len bytes')
    p.add_argument('--parallel', type=int, help='training processes at once (spread over the visible GPUs)')
    p.add_argument('--no-amp', action='store_true', help='float32 instead of bf16 autocast')
    common.add_kernel_options(p)
    common.add_model_options(p)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--corpus', help='corpus folder (default: /tmp/fla_mesa_byte_corpus/<settings>, built if absent)')
    p.add_argument('--cache-dir', default=os.path.join(RESULTS, 'quality_cache', 'byte_lm'))
    p.add_argument('--tag', help='output name: benchmarks/results/byte_lm_<tag>.md (default: the preset)')
    p.add_argument('--time-limit', type=float,
                   help='seconds after which runs checkpoint and stop (the same command resumes them)')
    p.add_argument('--checkpoint-seconds', type=float, default=300, help='a checkpoint at least this often')
    p.add_argument('--checkpoint-dir', help='default: /tmp/fla_mesa_quality_ckpt/<settings> (outside the checkout: '
                   'checkpoints are large and need not travel with the results)')
    p.add_argument('--retry-failed', action='store_true', help='run again runs cached as failed (not refused)')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.preset = 'tiny' if args.tiny else 'quick' if args.quick else 'full'
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.tag = args.tag or args.preset
    return args


def cg_pair(records, key):
    """'mean / p99' of CG steps over runs (the mean of means, the largest p99)."""
    vals = [r[key] for r in records if r[key]]
    return f'{sum(v["mean"] for v in vals) / len(vals):.1f} / {max(v["p99"] for v in vals)}' if vals else '-'


def write_report(args, records, sizes, manifest, folder):
    os.makedirs(RESULTS, exist_ok=True)
    env = next((r['environment'] for r in records.values() if r and 'environment' in r), common.environment())
    lines = [
        f'# Byte-level language models ({args.preset} preset)', '',
        f'Width {args.width}, {args.num_layers} layers, head dim {args.head_dim}, T = {args.seq_len}, batch '
        f'{args.batch_size}, {args.steps} steps ({args.steps * args.batch_size * args.seq_len:,} training bytes), '
        f'AdamW lr {args.lr:g} (warm-up 5%, cosine to 10%), bf16 autocast: {not args.no_amp}; seeds {args.seeds}. '
        f'Validation: the first {args.val_windows} windows of the validation files.', '',
        f'Corpus: train {manifest["train"]["files"]:,} files, {manifest["train"]["bytes"]:,} bytes (sha256 '
        f'`{manifest["train"]["sha256"][:16]}`); validation {manifest["val"]["files"]:,} files, '
        f'{manifest["val"]["bytes"]:,} bytes (`{manifest["val"]["sha256"][:16]}`); {manifest["duplicates"]:,} '
        f'duplicates dropped; Python {manifest["python"]}.', '',
        f'Environment: {json.dumps(env)}; device `{args.device}`. Cache: `{os.path.relpath(folder, RESULTS)}`.', '',
        *common.model_report_lines(args),
        '| model | params | val bpb (per seed) | mean | probe bpb 1st / 2nd occurrence | CG train mean / p99 | '
        'CG val mean / p99 | non-finite loss / grad | max grad norm | max spike | tokens/s (after the first tenth) |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for model in args.models:
        rs = [records[(model, s)] for s in args.seeds]
        ok = [r for r in rs if r and r['status'] == 'ok']
        if not ok:
            status = ' / '.join(sorted({r['status'] for r in rs if r})) or 'not yet run'
            lines.append(f'| {common.LABELS[model]} | {sizes[model]["params"]:,} | {status} | | | | | | | | |')
            continue
        bpb = [r['val_bpb'] for r in ok]
        probe = [r['probe'] for r in ok if r['probe']['bpb_second'] is not None]
        h = [r['health'] for r in ok]
        lines.append(
            f'| {common.LABELS[model]} | {ok[0]["params"]:,} | {", ".join(f"{b:.4f}" for b in bpb)} | '
            f'{sum(bpb) / len(bpb):.4f} | '
            + (f'{sum(p["bpb_first"] for p in probe) / len(probe):.3f} / '
               f'{sum(p["bpb_second"] for p in probe) / len(probe):.3f} ({probe[0]["lines"]} lines)' if probe else '-')
            + f' | {cg_pair(ok, "cg_steps_train")} | {cg_pair(ok, "cg_steps_eval")} | '
            f'{sum(x["nonfinite_loss"] for x in h)} / {sum(x["nonfinite_grad"] for x in h)} | '
            f'{max(x["max_grad_norm"] for x in h):.3g} | {max(x["max_grad_spike"] for x in h):.3g} | '
            f'{sum(r["tokens_per_second"] for r in ok) / len(ok):,.0f} |')
    bad = [(k, r) for k, r in records.items() if r and r['status'] not in ('ok', 'paused')]
    if bad:
        lines += ['', '## Runs that did not train', '']
        lines += [f'- {k[0]} seed {k[1]}: **{r["status"]}**: {r["error"].splitlines()[0][:300]}' for k, r in bad]
    mean_bpb = {}
    for model in args.models:
        bpb = [records[(model, s)]['val_bpb'] for s in args.seeds
               if records[(model, s)] and records[(model, s)]['status'] == 'ok']
        if len(bpb) == len(args.seeds):
            mean_bpb[model] = sum(bpb) / len(bpb)
    if 'mesa' in mean_bpb:
        others = [f'{common.LABELS[m]} {mean_bpb["mesa"] - mean_bpb[m]:+.4f}' for m in mean_bpb if m != 'mesa']
        lines += ['', 'MesaNet\'s mean validation bpb minus each model\'s (target: ≤ 0 against GLA and DeltaNet): '
                  + (', '.join(others) or 'no other model finished') + '.']
    missing = [k for k, r in records.items() if r is None]
    if missing:
        lines += ['', f'{len(missing)} runs not finished (run the same command again to resume).']
    lines += ['', f'Target MLP widths (params ±5% of fla-mesa MesaNet\'s {next(iter(sizes.values()))["target"]:,}): '
              + ', '.join(f'{m} {v["intermediate_size"]}' for m, v in sizes.items()) + '.']
    path = os.path.join(RESULTS, f'byte_lm_{args.tag}.md')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return common.run_worker(args.worker, train_run)
    corpus_kw = corpus_settings(args)
    if args.corpus is None:
        digest = hashlib.sha256(json.dumps(corpus_kw, sort_keys=True).encode()).hexdigest()[:10]
        args.corpus = os.path.join('/tmp', 'fla_mesa_byte_corpus', digest)
    manifest = byte_corpus.load_or_build(args.corpus, **corpus_kw)
    sizes = common.matched_sizes(args.models, vocab_size=256, hidden_size=args.width, num_layers=args.num_layers,
                                 head_dim=args.head_dim, max_len=args.seq_len, mesa_config=args.mesa_config)
    print(', '.join(f'{m} {v["params"]:,} (MLP {v["intermediate_size"]})' for m, v in sizes.items())
          + f'; target {next(iter(sizes.values()))["target"]:,} (±5%)')
    settings = dict(width=args.width, num_layers=args.num_layers, head_dim=args.head_dim, seq_len=args.seq_len,
                    batch_size=args.batch_size, steps=args.steps, lr=args.lr, val_windows=args.val_windows,
                    amp=not args.no_amp, device=args.device, corpus_sha256=manifest['train']['sha256'])
    settings.update(common.model_settings(args))
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = os.path.join(args.cache_dir, f'{args.preset}-{digest}')
    checkpoint_dir = args.checkpoint_dir or os.path.join('/tmp', 'fla_mesa_quality_ckpt', os.path.basename(folder))
    deadline = time.time() + args.time_limit if args.time_limit else float('inf')
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    jobs = []
    for seed in args.seeds:
        for model in args.models:
            key = f'{model}_s{seed}'
            result = os.path.join(folder, key + '.json')
            record = common.read_json(result)
            if record is not None and (record['status'] != 'failed' or not args.retry_failed):
                continue
            cell = dict(settings, autotune=args.autotune, fla_config_share=args.fla_config_share, model=model, seed=seed,
                        corpus=args.corpus, result=result,
                        threads=threads, intermediate_size=sizes[model]['intermediate_size'], deadline=deadline,
                        checkpoint_seconds=args.checkpoint_seconds, checkpoint_dir=checkpoint_dir)
            jobs.append(dict(key=key, result=result, log=os.path.join(folder, 'logs', key + '.log'),
                             env=common.worker_env(model, args.device),
                             argv=[sys.executable, os.path.abspath(__file__), '--worker', json.dumps(cell)]))
    common.run_jobs(jobs, args.parallel, 'byte-LM runs', args.time_limit, gpus=common.visible_gpus(args.device))
    records = {(m, s): common.read_json(os.path.join(folder, f'{m}_s{s}.json')) for s in args.seeds
               for m in args.models}
    path = write_report(args, records, sizes, manifest, folder)
    with open(path) as f:
        print(f.read())
    print(f'report: {path}')


if __name__ == '__main__':
    main()
