# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Training-step throughput of fla-mesa's MesaForCausalLM beside fla's MesaNet, GLA, DeltaNet, gated DeltaNet and
transformers' Llama with sdpa attention (issue 13), on one GPU.

Every model is built from its public config class with bf16 parameters and trained with torch's AdamW (its defaults)
on fresh random tokens each step (loss = the model's own causal LM loss with labels = input ids). Peers take the
width, depth, heads (head dim 128 for every model: GLA and DeltaNet with expand_k = expand_v = 1, gated DeltaNet
with expand_v = 1) and vocab of fla-mesa's model, fla's defaults otherwise, and an MLP intermediate size solved so
that their parameter count is within +-5% of fla-mesa's (the script stops if one is not).

Sizes: 'small' = 8 layers, hidden 1024, 8 heads of 128, vocab 32000 (fla-mesa's defaults otherwise);
'340M' = configs/mesa_340M.json. T = 2048, 4096, 8192 at constant B*T = --tokens (16384).

Per row: median ms/step over --steps timed steps after --warmup steps (each step synchronised), tokens/s, peak
memory (torch.cuda.max_memory_allocated over a step, measured in a process of the row's own after a first step:
parameters, AdamW state, activations; --in-process-peaks: in the timed process from the row's start), and the GPU
busy fraction of --profile-steps further steps run under torch.profiler: the union of the intervals of every
kernel, memcpy and memset in the trace (overlaps counted once) over the wall time of those same steps ('busy');
'busy/med' divides the same kernel time per step by the unprofiled median instead (the profiler's own host cost
is then left out). 'enqueue ms' is the host time from a step's start to the return of optimizer.step(), before
the synchronize: the host cost of a step when nothing in it waits for the GPU; a device-to-host copy inside the
step makes it wait, and then it is close to the whole step.

By default every Triton-using model is first run for one step of each of its rows in --warm-slices processes,
each with every autotuned kernel (fla's and fla-mesa's) cut to its share of the configs, all at once
(--warm-jobs; by default one per CPU core, as many as the GPU's memory holds), so that Triton's autotuners compile
their configs in parallel into Triton's on-disk cache (TRITON_CACHE_DIR); the timed run, one process, then finds
the binaries there. The whole default run (two sizes, three T, six models) is meant to take under 10 minutes on
one GPU, compiling included; the results file says how long it took. Autotuning choices are not cached
in that pass (TRITON_CACHE_AUTOTUNING=0): configs timed beside other processes would be picked on noise.

    python benchmarks/benchmark_training.py                        # warm in parallel, then the full table
    python benchmarks/benchmark_training.py --models fla-mesa fla-mesa-jacobi   # Jacobi alone beside the default ('auto')
    python benchmarks/benchmark_training.py --no-warm --models fla-mesa llama --sizes small --Ts 2048
    python benchmarks/benchmark_training.py --profile-host --models fla-mesa --sizes small --Ts 2048
    TRITON_INTERPRET=1 python benchmarks/benchmark_training.py --device cpu --tiny --out /tmp/t.md   # smoke test

--cuda-graph: the same rows with the whole step (forward, backward, AdamW with capturable=True) captured once in a
CUDA graph and replayed: what the step costs when the host launches nothing but the graph.

--compile: the same rows with each model under torch.compile (default mode; the warm-up steps compile): what the
step costs when the compiler fuses what it can trace and the rest runs eager between its graphs.

--kernels N: below the table, each row's N kernels with the most GPU time a step over the profiled steps (where a
model's GPU time goes, beside its peers'), and for fla-mesa's rows the configs its autotuners picked.

--profile-host: for the first of --models/--sizes/--Ts, one step under cProfile (synchronised only at its end):
the top 40 functions by cumulative and by total time, then torch.profiler's key_averages() sorted by self CPU
time (top 40), to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import io
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ['fla-mesa', 'fla-mesanet', 'gla', 'deltanet', 'gated-deltanet', 'llama']
# fla-mesa's model with other settings, asked for by name (`--models fla-mesa fla-mesa-jacobi`): not in the default run
MESA_VARIANTS = {'fla-mesa-jacobi': dict(precondition=True)}


def is_fla_mesa(name):
    return name == 'fla-mesa' or name in MESA_VARIANTS
SIZES = ['small', '340M']
TINY = dict(num_hidden_layers=2, hidden_size=64, num_heads=2, head_dim=32, vocab_size=256)
SMALL = dict(num_hidden_layers=8, hidden_size=1024, num_heads=8, head_dim=128, vocab_size=32000)
COLUMNS = ['model', 'size', 'T', 'B', 'params', 'ratio', 'ms/step', 'tokens/s', 'peak GiB', 'GPU ms/step',
           'busy', 'busy/med', 'enqueue ms', 'note']


def log(*a):
    print(*a, flush=True)


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# models


def mesa_config(size, tiny, device):
    from fla_mesa.models import MesaConfig
    if tiny:
        config = MesaConfig(**TINY)
    elif size == 'small':
        config = MesaConfig(**SMALL)
    elif size == '340M':
        with open(os.path.join(ROOT, 'configs', 'mesa_340M.json')) as f:
            fields = json.load(f)
        fields.pop('model_type', None)
        config = MesaConfig(**fields)
    else:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    config.use_cache = False
    if device != 'cuda':
        # fla's fused loss needs a GPU; its fused norm and SwiGLU autotune, which the Triton interpreter cannot
        config.fuse_cross_entropy = config.fuse_norm = config.fuse_swiglu = False
    return config


def peer_config(name, mesa, intermediate_size, max_T, device):
    """The config of peer `name` at the width, depth, heads and vocab of fla-mesa's config `mesa`."""
    h, L, H, D, V = mesa.hidden_size, mesa.num_hidden_layers, mesa.num_heads, mesa.head_dim, mesa.vocab_size
    fused = {k: device == 'cuda' for k in ('fuse_cross_entropy', 'fuse_norm', 'fuse_swiglu')}
    common = dict(hidden_size=h, num_hidden_layers=L, vocab_size=V, intermediate_size=intermediate_size,
                  use_cache=False, **fused)
    if H * D != h:
        raise ValueError(f"peers need num_heads * head_dim == hidden_size, got {H} * {D} != {h}")
    if name == 'fla-mesa':
        return mesa
    if name in MESA_VARIANTS:
        variant = copy.deepcopy(mesa)
        for key, value in MESA_VARIANTS[name].items():
            setattr(variant, key, value)
        return variant
    if name == 'fla-mesanet':
        from fla.models import MesaNetConfig
        return MesaNetConfig(num_heads=H, head_dim=D, **common)
    if name == 'gla':
        from fla.models import GLAConfig
        return GLAConfig(num_heads=H, expand_k=1.0, expand_v=1.0, **common)
    if name == 'deltanet':
        from fla.models import DeltaNetConfig
        return DeltaNetConfig(num_heads=H, expand_k=1.0, expand_v=1.0, **common)
    if name == 'gated-deltanet':
        from fla.models import GatedDeltaNetConfig
        return GatedDeltaNetConfig(num_heads=H, head_dim=D, expand_v=1.0, **common)
    if name == 'llama':
        from transformers import LlamaConfig
        return LlamaConfig(vocab_size=V, hidden_size=h, intermediate_size=intermediate_size, num_hidden_layers=L,
                           num_attention_heads=H, num_key_value_heads=H, head_dim=D, max_position_embeddings=max_T,
                           tie_word_embeddings=False, use_cache=False, attn_implementation='sdpa')
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def model_class(name):
    if is_fla_mesa(name):
        from fla_mesa.models import MesaForCausalLM
        return MesaForCausalLM
    if name == 'llama':
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM
    import fla.models
    return getattr(fla.models, {'fla-mesanet': 'MesaNetForCausalLM', 'gla': 'GLAForCausalLM',
                                'deltanet': 'DeltaNetForCausalLM',
                                'gated-deltanet': 'GatedDeltaNetForCausalLM'}[name])


def count_params(name, config):
    with torch.device('meta'):
        model = model_class(name)(config)
    return sum(p.numel() for p in model.parameters())


def matched_config(name, mesa, max_T, device):
    """
    Peer `name`'s config with its MLP intermediate size solved (the parameter count is linear in it) to match
    fla-mesa's parameter count; returns (config, params, target params).
    """
    target = count_params('fla-mesa', mesa)
    if is_fla_mesa(name):
        return peer_config(name, mesa, None, max_T, device), target, target
    # a multiple of 64 keeps the MLP's GEMMs on full tiles; tiny models need a finer step
    step = 64 if mesa.hidden_size >= 512 else 8
    a, b = 4 * step, 64 * step
    pa = count_params(name, peer_config(name, mesa, a, max_T, device))
    pb = count_params(name, peer_config(name, mesa, b, max_T, device))
    size = max(step, round((a + (target - pa) * (b - a) / (pb - pa)) / step) * step)
    config = peer_config(name, mesa, size, max_T, device)
    params = count_params(name, config)
    if abs(params / target - 1) > 0.05:
        raise SystemExit(f"{name}: {params} parameters at intermediate_size {size}, {params / target:.3f}x "
                         f"fla-mesa's {target}: outside +-5%")
    return config, params, target


def build(name, config, device, capturable=False):
    with torch.device(device):
        model = model_class(name)(config)
    if device != 'cuda':
        sys.path.insert(0, ROOT)
        from tests.interpret import interpret_compat
        interpret_compat()
    model = model.to(torch.bfloat16).train()
    if name == 'llama' and getattr(model.config, '_attn_implementation', 'sdpa') != 'sdpa':
        raise RuntimeError(f"Llama built with attention {model.config._attn_implementation!r}, not sdpa")
    # capturable: AdamW keeps its step count on the GPU, so a CUDA graph can replay it
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=capturable)


def step(model, opt, B, T, vocab, device):
    """One training step; returns the host seconds until optimizer.step() returned (nothing synchronised)."""
    t0 = time.perf_counter()
    ids = torch.randint(0, vocab, (B, T), device=device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# GPU busy time


def union_us(intervals):
    total, end = 0.0, float('-inf')
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def trace_events(prof):
    """The complete ('X') events of a finished torch.profiler run's Chrome trace (event categories are explicit there)."""
    fd, path = tempfile.mkstemp(suffix='.json')
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)
    finally:
        os.remove(path)
    events = events['traceEvents'] if isinstance(events, dict) else events
    return [e for e in events if e.get('ph') == 'X' and 'dur' in e]


DEVICE_CATS = {'kernel', 'gpu_memcpy', 'gpu_memset'}


def device_busy_us(prof, events=None):
    """
    Union of the device intervals (kernels, memcpy, memset) of a finished torch.profiler run, in microseconds:
    from its Chrome trace (`events`, `trace_events`'s list, if read already: a trace is exported once), else from
    its CUDA events' time ranges.
    """
    try:
        events = trace_events(prof) if events is None else events
        spans = [(float(e['ts']), float(e['ts']) + float(e['dur'])) for e in events
                 if str(e.get('cat', '')).lower() in DEVICE_CATS]
        if spans:
            return union_us(spans), 'trace'
    except Exception as e:  # noqa: BLE001 - fall back below
        log(f"  chrome trace unreadable ({type(e).__name__}: {e}); using profiler events")
    from torch.autograd import DeviceType
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return (union_us(spans), 'events') if spans else (None, 'none')


def idle_by_launcher(events, top=30):
    """
    Device idle time charged to what the device waited for: each gap before a kernel goes to the innermost two
    non-aten CPU ops (autograd functions, modules' ops) enclosing that kernel's launch. Returns [(us, count, name)].
    """
    import bisect
    from collections import Counter
    kernels = sorted((e for e in events if str(e.get('cat', '')).lower() in DEVICE_CATS), key=lambda e: e['ts'])
    launches = {e['args'].get('correlation'): e for e in events
                if e.get('cat') in ('cuda_runtime', 'cuda_driver') and 'args' in e}
    cpu = sorted((e for e in events if e.get('cat') in ('cpu_op', 'user_annotation')), key=lambda e: e['ts'])
    starts = [e['ts'] for e in cpu]
    idle, count, end = Counter(), Counter(), None
    for k in kernels:
        if end is not None and k['ts'] > end:
            launch = launches.get(k.get('args', {}).get('correlation'))
            name = '(launch not in trace)'
            if launch is not None:
                t = launch['ts']
                around = [c['name'] for c in cpu[:bisect.bisect_right(starts, t)] if c['ts'] + c['dur'] >= t]
                # named by the ops above aten's (an autograd function, the optimizer), else by the aten op itself
                above = [n for n in around if not n.startswith(('aten::', 'cuda'))]
                name = ' > '.join(n[:48] for n in (above or around)[-2:]) or '(no enclosing op)'
            idle[name] += k['ts'] - end
            count[name] += 1
        end = max(end or k['ts'], k['ts'] + k['dur'])
    return [(us, count[name], name) for name, us in idle.most_common(top)]


def graphed_step(model, opt, B, T, vocab):
    """
    The whole training step (forward, backward, AdamW) captured once in a CUDA graph, as PyTorch's whole-network
    capture recipe does; returns a step function like `step`'s that draws fresh tokens into the graph's input and
    replays it. The host then launches one graph a step instead of every kernel.
    """
    ids = torch.randint(0, vocab, (B, T), device='cuda')
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    def replay():
        t0 = time.perf_counter()
        ids.copy_(torch.randint(0, vocab, (B, T), device='cuda'))
        graph.replay()
        return time.perf_counter() - t0
    return replay


def kernel_ms(events, n):
    """{kernel name: GPU ms per step} from the Chrome trace events (`trace_events`) of a profiled run of n steps."""
    from collections import Counter
    total = Counter()
    for e in events:
        if str(e.get('cat', '')).lower() in DEVICE_CATS:
            total[e['name']] += float(e['dur']) / 1e3 / n
    return dict(total)


def profile_busy(do_step, device, n, kernels=None):
    """
    (device busy ms per step, wall ms per step) over n steps under torch.profiler; a dict given as `kernels` is
    filled with `kernel_ms`'s table.
    """
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == 'cuda' else [])
    with profile(activities=activities) as prof:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            do_step()
        sync(device)
        wall = time.perf_counter() - t0
    busy = None
    if device == 'cuda':
        try:
            events = trace_events(prof)
        except Exception as e:  # noqa: BLE001 - device_busy_us falls back to the profiler's events
            log(f"  chrome trace unreadable ({type(e).__name__}: {e})")
            events = []
        busy, _ = device_busy_us(prof, events)
        if kernels is not None:
            kernels.update(kernel_ms(events, n))
    return (busy / 1e3 / n if busy is not None else None), wall * 1e3 / n


# ---------------------------------------------------------------------------------------------------------------
# rows


def free(device):
    gc.collect()
    if device == 'cuda':
        torch.cuda.empty_cache()


def run_row(name, size, T, args, timed=True):
    B = args.tokens // T
    label = ' (graph)' if args.cuda_graph else ' (compiled)' if args.compile else ''
    row = dict(model=name + label, size='tiny' if args.tiny else size, T=T, B=B)
    model = opt = None
    try:
        if B < 1 or B * T != args.tokens:
            raise ValueError(f"--tokens {args.tokens} is not a multiple of T = {T}")
        mesa = mesa_config(size, args.tiny, args.device)
        config, params, target = matched_config(name, mesa, max(args.Ts), args.device)
        row.update(params=f"{params / 1e6:.1f}M", ratio=f"{params / target:.3f}")
        if args.device == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        model, opt = build(name, config, args.device, capturable=args.cuda_graph)
        if args.compile:
            # the first warm-up step compiles (the ops that torch.compile cannot trace run eager between its graphs)
            model = torch.compile(model)
        vocab = config.vocab_size
        for _ in range(args.warmup if timed else 1):
            step(model, opt, B, T, vocab, args.device)
        sync(args.device)
        if not timed:
            return row
        if args.cuda_graph:
            do_step = graphed_step(model, opt, B, T, vocab)
        else:
            def do_step():
                return step(model, opt, B, T, vocab, args.device)
        times, enqueue = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            enqueue.append(do_step())
            sync(args.device)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        row.update({'ms/step': f"{ms:.1f}", 'tokens/s': f"{B * T / ms * 1e3:,.0f}",
                    'enqueue ms': f"{statistics.median(enqueue) * 1e3:.1f}"})
        if args.device == 'cuda':
            row['peak GiB'] = f"{torch.cuda.max_memory_allocated() / 2**30:.3f}"
        if is_fla_mesa(name):
            row['picks'] = autotune_picks()
        if args.profile_steps > 0:
            row['kernels'] = {}
            busy_ms, wall_ms = profile_busy(do_step, args.device, args.profile_steps, row['kernels'])
            if busy_ms is not None:
                row.update({'GPU ms/step': f"{busy_ms:.1f}", 'busy': f"{busy_ms / wall_ms:.1%}",
                            'busy/med': f"{busy_ms / ms:.1%}"})
    except torch.cuda.OutOfMemoryError as e:
        row['note'] = 'OOM: ' + str(e).splitlines()[0][:120]
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - a failed row is a row with its reason
        msg = ' '.join(str(e).split())[:300]
        refused = name == 'gated-deltanet' and 'Triton' in msg
        row['note'] = ('refused: ' if refused else f"failed: {type(e).__name__}: ") + msg
        if not refused and args.verbose:
            traceback.print_exc()
    finally:
        del model, opt
        free(args.device)
    return row


# ---------------------------------------------------------------------------------------------------------------
# output


def versions():
    import triton
    out = dict(torch=torch.__version__, triton=triton.__version__)
    for mod in ('fla', 'transformers'):
        try:
            out[mod] = getattr(__import__(mod), '__version__', '?')
        except ImportError:
            out[mod] = 'not installed'
    return out


def commit():
    # COMMIT=...: where the files were copied without their git history
    if os.environ.get('COMMIT'):
        return os.environ['COMMIT']
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return (head + (' (tree dirty: tracked files modified)' if dirty else ' (clean tree)')) if head else 'unknown'
    except Exception:  # noqa: BLE001
        return 'unknown'


def device_name(device):
    if device == 'cuda':
        return torch.cuda.get_device_name()
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def header(args):
    v = versions()
    lines = [f"# Training step throughput ({'tiny smoke test' if args.tiny else 'issue 13'})", '',
             f"- device: {device_name(args.device)}",
             f"- torch {v['torch']}, triton {v['triton']}, fla {v['fla']}, transformers {v['transformers']}",
             f"- fla-mesa commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- command: `{' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}`"
             + (' (TRITON_INTERPRET=1)' if os.environ.get('TRITON_INTERPRET') == '1' else ''),
             f"- bf16 parameters, AdamW (torch defaults), fresh random tokens each step, B*T = {args.tokens}; "
             f"median of {args.steps} steps after {args.warmup} warm-up steps; busy over {args.profile_steps} "
             f"profiled steps (see the script's docstring for every column)", '']
    return '\n'.join(lines)


def table(rows):
    out = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for r in rows:
        out.append('| ' + ' | '.join(str(r.get(c, 'n/a' if c != 'note' else '')) for c in COLUMNS) + ' |')
    return '\n'.join(out) + '\n'


def autotune_picks():
    """{kernel: its configs in use} of fla-mesa's autotuned kernels, after a row's steps (one per autotune key)."""
    from tests.gpu_configs import describe, loaded_autotuners
    picks = {}
    for tuner in loaded_autotuners(('fla_mesa.',)):
        chosen = sorted({describe(c) for c in tuner.cache.values()})
        if chosen:
            picks[tuner.base_fn.__name__] = chosen
    return picks


def kernel_tables(rows, top):
    """
    Per row, the `top` kernels with the most GPU time a step (--kernels), and what the rest add up to; for fla-mesa's
    rows also the configs its autotuners chose (a pick that differs between runs moves a row's time).
    """
    out = []
    for r in rows:
        ms = r.get('kernels')
        if not ms:
            continue
        ranked = sorted(ms.items(), key=lambda kv: -kv[1])
        out += [f"### {r['model']}, {r['size']}, T = {r['T']}: GPU ms a step by kernel (sum {sum(ms.values()):.1f})", '',
                '| kernel | ms / step |', '|---|---|']
        out += [f"| {name[:110].replace('|', '/')} | {t:.2f} |" for name, t in ranked[:top]]
        if len(ranked) > top:
            out += [f"| ({len(ranked) - top} others) | {sum(t for _, t in ranked[top:]):.2f} |"]
        out += ['']
        if r.get('picks'):
            out += ['Autotuner picks: ' + '; '.join(f"`{k}` {', '.join(v)}" for k, v in sorted(r['picks'].items())), '']
    return '\n'.join(out)


def default_out(args, kind):
    if args.device != 'cuda':
        return os.path.join(tempfile.gettempdir(), f'{kind}_cpu.md')
    m = re.search(r'\b([a-z]+\d+[a-z]*)\b', torch.cuda.get_device_name().lower().replace('nvidia', ''))
    return os.path.join(HERE, 'results', f"{kind}_{m.group(1) if m else 'gpu'}.md")


# ---------------------------------------------------------------------------------------------------------------
# modes


def warm(args):
    """
    Processes that each run one step of every T of one model, all at once: each Triton-using model in
    --warm-slices processes, process I with every autotuned kernel of fla and fla-mesa cut to its configs I,
    I + N, ... (`tests.gpu_configs.slice_configs`). The small size runs whatever the sizes asked for: 340M has the
    same layers, hence the same kernels and binaries, only more of them (and 16 processes of it at once ran out of
    an H200's memory).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING='0')
    base = [sys.executable, os.path.abspath(__file__), '--compile-only', '--no-warm', '--device', args.device,
            '--sizes', 'small', '--Ts', *map(str, args.Ts), '--tokens', str(args.tokens)]
    if args.tiny:
        base.append('--tiny')
    cmds = []
    # every Triton-using model (Llama runs none) in --warm-slices processes, each compiling its share of the configs
    # of every autotuned kernel (fla's carry 30-48 each: one process compiling them all ran past its time limit)
    n = args.warm_slices if args.device == 'cuda' else 1
    for m in args.models:
        if m != 'llama':
            cmds += [base + ['--models', m, '--config-slice', str(i), str(n)] for i in range(n)]

    def launch(cmd):
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.warm_timeout, env=env)
            tail = [line for line in p.stdout.splitlines() if 'failed' in line or 'OOM' in line or 'refused' in line]
            status = 'ok' if p.returncode == 0 else f"exit {p.returncode}: " + \
                (p.stderr.strip().splitlines() or [''])[-1][:200]
            status += ''.join('\n    ' + line for line in tail)
        except subprocess.TimeoutExpired:
            status = 'timeout'
        return f"  warm {time.time() - t0:5.0f} s  {' '.join(cmd[cmd.index('--models') + 1:])}: {status}"

    jobs = args.warm_jobs or default_warm_jobs(args.device)
    log(f"warm: {len(cmds)} compile processes, {jobs} at a time")
    t0 = time.time()
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for future in as_completed([pool.submit(launch, c) for c in cmds]):
            log(future.result())
    elapsed = time.time() - t0
    log(f"warm: {elapsed:.0f} s in all")
    return f"the compile pass {elapsed:.0f} s ({len(cmds)} processes, {jobs} at a time)"


def cpu_cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def peak_one_row(name, size, T, args):
    """
    (--peak-only) max_memory_allocated over one training step of one row, after a first step (which autotunes
    and compiles) in this process: parameters, AdamW state and the step's activations and temporaries.
    """
    B = args.tokens // T
    config, _, _ = matched_config(name, mesa_config(size, args.tiny, 'cuda'), max(args.Ts), 'cuda')
    model, opt = build(name, config, 'cuda')
    step(model, opt, B, T, config.vocab_size, 'cuda')
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(model, opt, B, T, config.vocab_size, 'cuda')
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def peak_estimate(name, size, T):
    """A row's peak memory in bytes, from above (the measured peaks: results/training_h200.md, section 12)."""
    return (28 if size == '340M' else 14) << 30 if name == 'llama' else (19 if size == '340M' else 8) << 30


class MemoryBudget:
    """Bytes of GPU memory shared out to processes: `hold(n)` waits until n fit (one larger than all runs alone)."""

    def __init__(self, total):
        self.total, self.used, self.cond = total, 0, threading.Condition()

    @contextlib.contextmanager
    def hold(self, n):
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.total)
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()


def fresh_peaks(args):
    """
    Each row's peak memory in a process of its own (`peak_one_row`), several at a time. In one process the peak a
    row reaches depends on the rows run before it, by a few MiB (most likely the caching allocator's accounting of
    the blocks it reuses), enough to decide a comparison of models. Every autotuned kernel keeps its first config
    there (no autotuning; the memory a step allocates does not depend on it). Returns {(model, size, T): bytes}.
    """
    from concurrent.futures import ThreadPoolExecutor
    base = [sys.executable, os.path.abspath(__file__), '--no-warm', '--device', 'cuda', '--tokens', str(args.tokens),
            '--Ts', *map(str, args.Ts), '--config-slice', '0', str(1 << 20)] + (['--tiny'] if args.tiny else [])
    rows = [(name, size, T) for size in args.sizes for T in args.Ts for name in args.models]

    def launch(row):
        name, size, T = row
        cmd = base + ['--models', name, '--sizes', size, '--peak-only', str(T)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.warm_timeout)
        except subprocess.TimeoutExpired:
            return row, None
        found = re.findall(r'^peak bytes: (\d+)$', p.stdout, re.M)
        return row, int(found[-1]) if found else None

    free, _ = torch.cuda.mem_get_info()
    cores = cpu_cores()
    budget = MemoryBudget(0.9 * free)
    t0 = time.time()

    def launch_within_budget(row):
        with budget.hold(peak_estimate(*row)):
            return launch(row)

    # a process a core, as many at once as their estimated peaks fit in the GPU's free memory
    with ThreadPoolExecutor(max(1, cores)) as pool:
        peaks = {row: peak for row, peak in pool.map(launch_within_budget, rows) if peak}
    log(f"peaks: {len(peaks)} of {len(rows)} rows, one process each, {time.time() - t0:.0f} s")
    return peaks


def default_warm_jobs(device):
    """A compile process per CPU core (compiling is CPU-bound), no more than fit in the GPU's free memory: each runs
    a step of the small model, 7 GiB at its peak."""
    cores = cpu_cores()
    if device != 'cuda':
        return max(1, cores)
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(cores, free // (8 << 30)))


def mesa_config_count():
    sys.path.insert(0, ROOT)
    from tests.gpu_configs import gpu_configs
    return max(len(configs) for _, configs in gpu_configs().values())


def pin_config(i):
    """Every fla-mesa chunk kernel pinned to its config i (mod its count): the compile pass splits them so."""
    sys.path.insert(0, ROOT)
    from tests.gpu_configs import pin_all
    pin_all(i)


def profile_host(args):
    name, size, T = args.models[0], args.sizes[0], args.Ts[0]
    B = args.tokens // T
    mesa = mesa_config(size, args.tiny, args.device)
    config, params, _ = matched_config(name, mesa, T, args.device)
    model, opt = build(name, config, args.device)
    for _ in range(max(1, args.warmup)):
        step(model, opt, B, T, config.vocab_size, args.device)
    sync(args.device)
    out = [header(args), f"## {name}, {size}, T = {T}, B = {B}, {params / 1e6:.1f}M parameters", '']

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    step(model, opt, B, T, config.vocab_size, args.device)
    sync(args.device)
    prof.disable()
    out.append(f"one step under cProfile: {(time.perf_counter() - t0) * 1e3:.1f} ms wall (synchronised at its end)\n")
    for key in ('cumulative', 'tottime'):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(40)
        out += [f"### cProfile, top 40 by {key}", '', '```', s.getvalue().strip(), '```', '']

    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == 'cuda' else [])
    with profile(activities=activities) as tprof:
        step(model, opt, B, T, config.vocab_size, args.device)
        sync(args.device)
    out += ['### torch.profiler key_averages(), top 40 by self CPU time', '', '```',
            tprof.key_averages().table(sort_by='self_cpu_time_total', row_limit=40), '```', '']
    if args.device == 'cuda':
        out += ['### device idle before each kernel, by the CPU ops that launched it (one profiled step)', '',
                '| idle ms | gaps | launched from |', '|---|---|---|']
        out += [f"| {us / 1e3:.2f} | {n} | {name} |" for us, n, name in idle_by_launcher(trace_events(tprof))]
        out.append('')
    path = args.out or default_out(args, f'training_host_{name}')
    with open(path, 'w') as f:
        f.write('\n'.join(out))
    log(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=MODELS, choices=MODELS + list(MESA_VARIANTS))
    p.add_argument('--sizes', nargs='+', default=SIZES, choices=SIZES)
    p.add_argument('--Ts', nargs='+', type=int, default=None, help='sequence lengths (default 2048 4096 8192)')
    p.add_argument('--tokens', type=int, default=None, help='B*T of every row (default 16384; --tiny 128)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--profile-steps', type=int, default=3, help='steps under torch.profiler for busy (0: none)')
    p.add_argument('--out', default=None, help='markdown file (default benchmarks/results/training_<gpu>.md)')
    p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    p.add_argument('--tiny', action='store_true', help='2 layers, hidden 64, 2 heads of 32, vocab 256, T 64')
    p.add_argument('--no-warm', action='store_true', help='skip the parallel compile pass')
    p.add_argument('--warm-jobs', type=int, default=None,
                   help='processes at a time in the compile pass (default: one per CPU core, as many as fit in the '
                        "GPU's free memory at 8 GiB each)")
    p.add_argument('--warm-timeout', type=int, default=420, help='seconds per compile process')
    p.add_argument('--compile-only', action='store_true', help='(the compile pass) one step per row, no timing')
    p.add_argument('--pin-config', type=int, default=None, help='(the compile pass) fla-mesa kernels at config I')
    p.add_argument('--config-slice', type=int, nargs=2, default=None, metavar=('I', 'N'),
                   help="(the compile pass) every fla and fla-mesa kernel's configs I, I + N, ...")
    p.add_argument('--warm-slices', type=int, default=5, help='compile processes per model in the compile pass')
    p.add_argument('--profile-host', action='store_true', help='cProfile + torch.profiler of one step')
    p.add_argument('--peak-only', type=int, default=None, metavar='T',
                   help="(the peak pass) print the peak memory of the first model's row at T in this process")
    p.add_argument('--in-process-peaks', action='store_true',
                   help="peak memory from the timed process (history-dependent) instead of a process a row")
    p.add_argument('--cuda-graph', action='store_true',
                   help='time the whole step captured in one CUDA graph (model rows say "graph")')
    p.add_argument('--compile', action='store_true', help='each model under torch.compile (default mode)')
    p.add_argument('--kernels', type=int, default=0, metavar='N',
                   help='below the table, each row\'s N kernels with the most GPU time a step (profiled steps)')
    p.add_argument('--verbose', action='store_true', help='tracebacks of failed rows')
    args = p.parse_args(argv)
    args.Ts = args.Ts or ([64] if args.tiny else [2048, 4096, 8192])
    args.tokens = args.tokens or (128 if args.tiny else 16384)
    if args.tiny:
        args.sizes = args.sizes[:1]  # --tiny replaces the size
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (with TRITON_INTERPRET=1 and --tiny) for a smoke test")
    if args.cuda_graph and args.device != 'cuda':
        raise SystemExit("--cuda-graph needs --device cuda")
    if args.cuda_graph and args.compile:
        raise SystemExit("--cuda-graph and --compile are two ways to cut host time: one at a time")
    if args.profile_host:
        return profile_host(args)
    if args.compile_only and args.pin_config is not None:
        pin_config(args.pin_config)
    if args.config_slice is not None and (args.peak_only is not None or args.compile_only):
        sys.path.insert(0, ROOT)
        from tests.gpu_configs import slice_configs
        slice_configs(*args.config_slice)
    if args.peak_only is not None:
        print(f"peak bytes: {peak_one_row(args.models[0], args.sizes[0], args.peak_only, args)}", flush=True)
        return
    if args.compile_only:
        for size in args.sizes:
            for T in args.Ts:
                for name in args.models:
                    row = run_row(name, size, T, args, timed=False)
                    log(f"compiled {name} {size} T={T}: {row.get('note', 'ok')}")
        return
    t_start = time.time()
    warm_note = 'no compile pass' if args.no_warm else warm(args)
    # the peak pass runs eager steps: graphed and compiled rows keep their own process's peak
    fresh = args.device == 'cuda' and not (args.in_process_peaks or args.cuda_graph or args.compile)
    peaks = fresh_peaks(args) if fresh else {}
    out = args.out or default_out(args, 'training')
    head, rows = header(args), []
    log(head)
    for size in args.sizes:
        for T in args.Ts:
            for name in args.models:
                t0 = time.time()
                row = run_row(name, size, T, args)
                if fresh and 'peak GiB' in row:
                    peak = peaks.get((name, size, T))
                    row['note'] = (row.get('note', '') + f" in-process peak {row['peak GiB']} GiB").strip()
                    row['peak GiB'] = 'n/a' if peak is None else f"{peak / 2**30:.3f}"
                rows.append(row)
                log(f"[{time.time() - t_start:5.0f} s] " + ' | '.join(f"{c} {row[c]}" for c in COLUMNS if c in row)
                    + f"  ({time.time() - t0:.0f} s)")
                with open(out, 'w') as f:
                    f.write(head + '\n' + table(rows))
    with open(out, 'a') as f:
        f.write(f"\n{time.time() - t_start:.0f} s in all, {warm_note}.\n")
        if args.kernels > 0:
            f.write('\n' + kernel_tables(rows, args.kernels))
    log('\n' + table(rows) + ('\n' + kernel_tables(rows, args.kernels) if args.kernels > 0 else ''))
    log(f"wrote {out}; {time.time() - t_start:.0f} s in all")


if __name__ == '__main__':
    main()
