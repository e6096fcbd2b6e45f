# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
What is alive on the GPU at a training step's peak (issue 13's "peak memory <= fla's MesaNet"): for each model of
`benchmark_training.py` (its sizes, inputs and step), torch's allocator history over the build and two steps, the
moment of the largest allocated total, and the blocks alive then grouped by the first frame outside torch (the
code that allocated them). Prints one markdown table a model.

    python benchmarks/tools/peak_memory.py --models fla-mesa fla-mesanet [--Ts 2048 8192] [--top 25] [--blocks STR ...]

Then `max_memory_allocated` over the forward, the backward and the optimizer step of a third step.
"""

import argparse
import collections
import os
import sys
import traceback

import torch

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(BENCHMARKS), BENCHMARKS]

import benchmark_training as bt  # noqa: E402


def owner(frames):
    """The first Python frame outside torch and Python's own files: `file:line function`."""
    for f in frames:
        name = f['filename']
        if not name.endswith('.py') or '/torch/' in name or '/python3' in name and 'site-packages' not in name:
            continue
        short = name.split('site-packages/')[-1].split('fla_mesa/')[-1]
        return f"{short}:{f['line']} {f['name']}"
    return '(torch internals)'


def live_at_peak(trace):
    """
    `(peak bytes, {address: (size, frames)}, the allocation that reached the peak)` over a device trace: a block
    counts from its alloc to its free request (as torch's allocated bytes do; a block used on another stream
    completes its free later).
    """
    live, total, best, best_live, last = {}, 0, -1, {}, None
    for e in trace:
        if e['action'] == 'alloc':
            live[e['addr']] = (e['size'], e.get('frames', []))
            total += e['size']
            if total > best:
                best, best_live, last = total, dict(live), e
        elif e['action'] in ('free_requested', 'free_completed') and e['addr'] in live:
            total -= live.pop(e['addr'])[0]
    return best, best_live, last


def phase_peaks(model, opt, B, T, vocab):
    """`max_memory_allocated` over each phase of one step (`benchmark_training.step`'s, split): which phase sets the peak."""
    peaks = {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, vocab, (B, T), device='cuda')
    loss = model(input_ids=ids, labels=ids).loss
    for phase, fn in (('forward', None), ('backward', loss.backward), ('optimizer', opt.step)):
        if fn is not None:
            fn()
        torch.cuda.synchronize()
        peaks[phase] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    opt.zero_grad(set_to_none=True)
    return peaks


def run(name, args):
    mesa = bt.mesa_config('small', False, 'cuda')
    config, _, _ = bt.matched_config(name, mesa, args.T, 'cuda')
    B = args.tokens // args.T
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    model, opt = bt.build(name, config, 'cuda')
    for _ in range(2):
        bt.step(model, opt, B, args.T, config.vocab_size, 'cuda')
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    best, blocks, last = live_at_peak(snap['device_traces'][0])
    groups = collections.Counter()
    for size, frames in blocks.values():
        groups[owner(frames)] += size
    print(f"\n### {name}, T = {args.T}, B = {B}: max_memory_allocated {peak / 2**20:.1f} MiB, traced peak "
          f"{best / 2**20:.1f} MiB ({len(blocks)} blocks), reached by {last['size'] / 2**20:.2f} MiB at "
          f"`{owner(last.get('frames', []))}`\n")
    print("| allocated by | MiB |\n|---|---|")
    for where, size in groups.most_common(args.top):
        print(f"| `{where}` | {size / 2**20:.2f} |")
    for pattern in args.blocks:
        sizes = collections.Counter(size for size, frames in blocks.values() if pattern in owner(frames))
        print(f"\nblocks alive at the traced peak from `{pattern}`: "
              + ", ".join(f"{n} x {size / 2**20:.3f} MiB" for size, n in sorted(sizes.items(), reverse=True)))
    # what stays allocated between steps (parameters, optimizer states, workspaces, anything a step leaves behind)
    resident = collections.Counter()
    for segment in snap['segments']:
        for block in segment['blocks']:
            if block['state'] == 'active_allocated':
                resident[owner(block.get('frames', []))] += block['size']
    print(f"\nallocated after the steps: {sum(resident.values()) / 2**20:.1f} MiB; "
          + ", ".join(f"`{where}` {size / 2**20:.2f}" for where, size in resident.most_common(args.top)))
    phases = phase_peaks(model, opt, B, args.T, config.vocab_size)
    print("\nmax_memory_allocated by phase of a third step (MiB): "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in phases.items()))
    del model, opt
    bt.free('cuda')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['fla-mesa', 'fla-mesanet'])
    p.add_argument('--Ts', type=int, nargs='+', default=[2048])
    p.add_argument('--tokens', type=int, default=16384)
    p.add_argument('--top', type=int, default=25)
    p.add_argument('--blocks', nargs='*', default=[], help="list the sizes of the blocks alive at the peak from "
                   "the allocators whose name contains each string")
    args = p.parse_args()
    print(bt.header(argparse.Namespace(device='cuda', tiny=False, tokens=args.tokens, steps=2, warmup=0, profile_steps=0)))
    for args.T in args.Ts:
        for name in args.models:
            try:
                run(name, args)
            except Exception:
                traceback.print_exc()


if __name__ == '__main__':
    main()
