# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Decode latency and throughput of `generate()` (issue 13, item 4): fla-mesa's MesaForCausalLM, eager and with
`decode_cuda_graph=True` ('fla-mesa-graph': each decode step one replayed CUDA graph), fla's MesaNetForCausalLM and
transformers' LlamaForCausalLM with sdpa attention, at the 'small' size of benchmark_training.py (8 layers, hidden
1024, 8 heads of 128, vocab 32000; every peer's MLP sized to the same parameter count, as there), bf16 parameters,
eval mode.

Per row (model, B): a random prompt of --prompt tokens; greedy generate() with a fixed number of new tokens (min =
max, no early stop). 'prefill ms' = generate(max_new_tokens=1): the prompt's forward and one token from its logits.
'decode ms/token' = (time of generate(N) − time of generate(1)) / (N − 1), N = --new-tokens: one decode step from
the cache, prefill excluded; 'tokens/s' = B / that. Medians over --repeats, after one untimed generate(N) of the same
shapes (compiles, autotuning, graph capture). Each timed call is synchronised at its end.

On a GPU, fla-mesa's chunk kernels (the prefill only) are pinned to their first autotune config (--autotune-prefill
to autotune them): compiling every config takes minutes, and decode is what is measured.

'launches' mode (--count-launches) counts what one decode step of each model launches, per layer: Triton kernels
(each launch of a jitted kernel), aten ops that run a kernel (views and allocations left out) and host syncs
(nonzero, item), from a generate() on a short prompt; on a GPU also the CUDA kernels in a torch.profiler trace.

    python benchmarks/benchmark_generate.py                                   # GPU: the table, about 3-4 minutes
    python benchmarks/benchmark_generate.py --count-launches --Bs 1
    TRITON_INTERPRET=1 python benchmarks/benchmark_generate.py --device cpu --tiny --out /tmp/g.md   # smoke test
"""

from __future__ import annotations

import argparse
import collections
import copy
import inspect
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark_training import (  # noqa: E402
    ROOT, commit, device_name, log, matched_config, mesa_config, model_class, pin_config, sync, versions,
)

MODELS = ['fla-mesa', 'fla-mesa-graph', 'fla-mesanet', 'llama']
COLUMNS = ['model', 'B', 'prompt', 'new', 'params', 'prefill ms', 'decode ms/token', 'tokens/s', 'note']
# ops that run no kernel: views, metadata, allocations
NO_KERNEL = {'view', '_unsafe_view', 't', 'transpose', 'reshape', '_reshape_alias', 'squeeze', 'unsqueeze', 'slice',
             'select', 'expand', 'as_strided', 'permute', 'split', 'unbind', 'alias', 'detach', 'empty', 'empty_like',
             'new_empty', 'empty_strided', 'lift_fresh', 'split_with_sizes', 'unflatten', 'flatten'}
SYNCS = {'nonzero', '_local_scalar_dense', 'item', 'is_nonzero'}


def build(name, args):
    """(model in eval mode, bf16; its parameter count) at the size of benchmark_training's 'small' (or --tiny)."""
    mesa = mesa_config('small', args.tiny, args.device)
    peer = 'fla-mesa' if name == 'fla-mesa-graph' else name
    config, params, _ = matched_config(peer, copy.deepcopy(mesa), args.prompt + args.new_tokens, args.device)
    config.use_cache = True
    if os.environ.get('TRITON_INTERPRET') == '1' and hasattr(config, 'fuse_norm'):
        # fla's fused norm and SwiGLU run under the interpreter too: the modules a GPU runs, counted as there
        config.fuse_norm = config.fuse_swiglu = True
    if name == 'fla-mesa-graph':
        config.decode_cuda_graph = True
    with torch.device(args.device):
        model = model_class(peer)(config)
    if args.device != 'cuda':
        from tests.interpret import interpret_compat
        interpret_compat()
    model = model.to(torch.bfloat16).eval()
    if name == 'fla-mesanet' and 'cache' not in inspect.signature(model.forward).parameters:
        # transformers >= 5.24 hands the cache over as `cache`, which fla 0.6's forward would drop (decoding every
        # token from an empty state); fla-mesa's forward maps it itself
        forward = model.forward

        def mapped(*a, cache=None, **kw):
            if cache is not None:
                kw['past_key_values'] = cache
            return forward(*a, **kw)
        model.forward = mapped
    return model, params


def generate(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, use_cache=True, pad_token_id=0)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def run_row(name, B, args):
    row = dict(model=name, B=B, prompt=args.prompt, new=args.new_tokens)
    model = None
    try:
        model, params = build(name, args)
        row['params'] = f"{params / 1e6:.1f}M"
        vocab = model.config.vocab_size
        gen = torch.Generator(device='cpu').manual_seed(B)
        prompts = [torch.randint(0, vocab, (B, args.prompt), generator=gen).to(args.device)
                   for _ in range(args.repeats + 1)]
        with torch.no_grad():
            out = generate(model, prompts[0], args.new_tokens)
            if out.shape != (B, args.prompt + args.new_tokens):
                raise RuntimeError(f"generate() returned shape {tuple(out.shape)}")
            if name == 'fla-mesa-graph' and not (getattr(model, '_decode_graphs', {}).get(B)
                                                 and model._decode_graphs[B].graph is not None):
                raise RuntimeError('the decode graph was not used (generate() decoded eagerly)')
            t1 = [timed(lambda: generate(model, p, 1), args.device)[0] for p in prompts[1:]]
            tn = [timed(lambda: generate(model, p, args.new_tokens), args.device)[0] for p in prompts[1:]]
        prefill, total = statistics.median(t1), statistics.median(tn)
        per_token = (total - prefill) / (args.new_tokens - 1)
        row.update({'prefill ms': f"{prefill * 1e3:.1f}", 'decode ms/token': f"{per_token * 1e3:.3f}",
                    'tokens/s': f"{B / per_token:,.0f}"})
    except torch.cuda.OutOfMemoryError as e:
        row['note'] = 'OOM: ' + str(e).splitlines()[0][:120]
    except Exception as e:  # noqa: BLE001 - a failed row is a row with its reason
        row['note'] = f"failed: {type(e).__name__}: " + ' '.join(str(e).split())[:300]
        if args.verbose:
            traceback.print_exc()
    finally:
        del model
        if args.device == 'cuda':
            torch.cuda.empty_cache()
    return row


def count_launches(name, B, args):
    """What one decode step launches: {'triton', 'aten', 'syncs', 'cuda kernels'} per step, and the aten op names."""
    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    model, _ = build(name, args)
    counts, ops, depth = collections.Counter(), collections.Counter(), [0]
    classes = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    saved = {cls: cls.run for cls in classes}

    def patched(original):
        def run(self, *a, **kw):
            counts['triton'] += depth[0] == 0
            depth[0] += 1
            try:
                return original(self, *a, **kw)
            finally:
                depth[0] -= 1
        return run

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            # ops inside a Triton launch are the interpreter's own copies
            if depth[0] == 0 and op not in NO_KERNEL:
                ops[op] += 1
                counts['syncs' if op in SYNCS else 'aten'] += 1
            return func(*args, **(kwargs or {}))

    forward, steps = model.forward, [0]

    def counted(*a, **kw):
        ids = kw.get('input_ids', a[0] if a else None)
        if ids is None or ids.shape[1] != 1:
            return forward(*a, **kw)
        steps[0] += 1
        for cls in classes:
            cls.run = patched(saved[cls])
        try:
            with Ops():
                return forward(*a, **kw)
        finally:
            for cls in classes:
                cls.run = saved[cls]
    ids = torch.randint(0, model.config.vocab_size, (B, 16), device=args.device)
    with torch.no_grad():
        generate(model, ids, 3)   # compiles, autotunes, captures
        model.forward = counted
        generate(model, ids, 5)
        model.forward = forward
        if args.device == 'cuda':
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                generate(model, ids, 5)
                sync(args.device)
            cuda_kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                generate(model, ids, 1)
                sync(args.device)
            prefill = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            counts['cuda kernels'] = (cuda_kernels - prefill) * steps[0] / 4
    L = model.config.num_hidden_layers
    per_step = {k: v / steps[0] for k, v in counts.items()}
    return per_step, L, {k: v / steps[0] for k, v in ops.most_common()}


def header(args, title):
    v = versions()
    return '\n'.join([
        f"# {title}", '',
        f"- device: {device_name(args.device)}",
        f"- torch {v['torch']}, triton {v['triton']}, fla {v['fla']}, transformers {v['transformers']}",
        f"- fla-mesa commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- command: `{' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}`"
        + (' (TRITON_INTERPRET=1)' if os.environ.get('TRITON_INTERPRET') == '1' else ''),
        f"- {'tiny (2 layers, hidden 64)' if args.tiny else 'small (8 layers, hidden 1024, 8 heads of 128, vocab 32000)'}"
        f", bf16, eval mode, greedy generate(); medians of {args.repeats} (see the script's docstring)", ''])


def table(rows, columns):
    out = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    out += ['| ' + ' | '.join(str(r.get(c, 'n/a' if c != 'note' else '')) for c in columns) + ' |' for r in rows]
    return '\n'.join(out) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=MODELS, choices=MODELS)
    p.add_argument('--Bs', nargs='+', type=int, default=None, help='batch sizes (default 1 8 64; --tiny 1 2)')
    p.add_argument('--prompt', type=int, default=None, help='prompt tokens (default 2048; --tiny 8)')
    p.add_argument('--new-tokens', type=int, default=None, help='new tokens per generate() (default 64; --tiny 3)')
    p.add_argument('--repeats', type=int, default=None, help='timed generate() calls each (default 3; --tiny 1)')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    p.add_argument('--tiny', action='store_true', help='2 layers, hidden 64, 2 heads of 32, vocab 256')
    p.add_argument('--autotune-prefill', action='store_true', help="autotune fla-mesa's chunk kernels (slow)")
    p.add_argument('--count-launches', action='store_true', help='count what one decode step launches, per layer')
    p.add_argument('--out', default=None, help='markdown file (default benchmarks/results/generate_<gpu>.md)')
    p.add_argument('--verbose', action='store_true', help='tracebacks of failed rows')
    args = p.parse_args(argv)
    args.Bs = args.Bs or ([1, 2] if args.tiny else [1, 8, 64])
    args.prompt = args.prompt or (8 if args.tiny else 2048)
    args.new_tokens = args.new_tokens or (3 if args.tiny else 64)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be at least 2 (the decode time is a difference), got {args.new_tokens}")
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (with TRITON_INTERPRET=1 and --tiny) for a smoke test")
    if args.device == 'cuda' and not args.autotune_prefill:
        pin_config(0)
    from benchmark_training import default_out
    t_start = time.time()
    if args.count_launches:
        cols = ['model', 'B', 'layers', 'triton / layer', 'aten / layer', 'syncs / step', 'CUDA kernels / layer',
                'top aten ops / step']
        rows = []
        for name in args.models:
            if name == 'fla-mesa-graph' and args.device != 'cuda':
                continue
            for B in args.Bs:
                c, L, ops = count_launches(name, B, args)
                rows.append({'model': name, 'B': B, 'layers': L, 'triton / layer': f"{c.get('triton', 0) / L:.2f}",
                             'aten / layer': f"{c.get('aten', 0) / L:.2f}", 'syncs / step': f"{c.get('syncs', 0):.1f}",
                             'CUDA kernels / layer': f"{c['cuda kernels'] / L:.2f}" if 'cuda kernels' in c else 'n/a',
                             'top aten ops / step': ', '.join(f"{k} {v:g}" for k, v in list(ops.items())[:12])})
                log(rows[-1])
        text = header(args, 'What one decode step launches') + '\n' + table(rows, cols)
        out = args.out or default_out(args, 'generate_launches')
    else:
        rows = []
        head = header(args, 'generate() decode latency and throughput (issue 13, item 4)')
        out = args.out or default_out(args, 'generate')
        for B in args.Bs:
            for name in args.models:
                if name == 'fla-mesa-graph' and args.device != 'cuda':
                    continue  # CUDA graphs need a GPU
                t0 = time.time()
                rows.append(run_row(name, B, args))
                log(f"[{time.time() - t_start:5.0f} s] " + ' | '.join(f"{c} {rows[-1][c]}" for c in COLUMNS
                                                                        if c in rows[-1]) + f"  ({time.time() - t0:.0f} s)")
                with open(out, 'w') as f:
                    f.write(head + '\n' + table(rows, COLUMNS))
        text = head + '\n' + table(rows, COLUMNS)
    with open(out, 'w') as f:
        f.write(text)
    log('\n' + text)
    log(f"wrote {out}; {time.time() - t_start:.0f} s in all")


if __name__ == '__main__':
    main()
