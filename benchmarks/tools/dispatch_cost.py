# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The host cost of dispatching one launch of each autotuned kernel of fla-mesa's op and of fla's MesaNet op (issue 13,
item 2), before Triton's own launcher: the Python of the `triton.heuristics` and `triton.autotune` wrappers, whose
autotuner builds its cache key from every argument of every call. The kernel's `run` is stubbed out and the
autotuner's choice made once, as on a GPU after the first call; the arguments are stand-ins (small CPU tensors,
ints), which the wrappers only look at, not use.

On the CPU, no GPU needed: this is what `host_overhead.py` cannot see, as under Triton's interpreter fla-mesa's
kernels have one config each and no key is built.

    python benchmarks/tools/dispatch_cost.py [--out FILE]
"""

from __future__ import annotations

import os

os.environ['TRITON_INTERPRET'] = '0'  # the autotuners' GPU configs, as a GPU run has them

import argparse  # noqa: E402
import importlib  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import timeit  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

MODULES = {
    'fla-mesa': ['fla_mesa.ops.mesa.chunk_cg', 'fla_mesa.ops.mesa.chunk_h', 'fla_mesa.ops.mesa.chunk_bwd',
                 'fla_mesa.ops.mesa.chunk_o'],
    "fla's MesaNet": ['fla.ops.mesa_net.chunk_h_fwd', 'fla.ops.mesa_net.chunk_h_kv_intra_bwd',
                      'fla.ops.mesa_net.chunk_h_kv_intra_bwd_separate'],
}
# stand-ins for the key's shape constexprs (the training shapes: K = V = 128, chunks of 64)
SHAPES = {'H': 8, 'K': 128, 'V': 128, 'BT': 64, 'BK': 128, 'BV': 128, 'NR': 1, 'PREC': 'bf16x3', 'M': 128, 'N': 128}


def layers(kernel):
    out = []
    while not isinstance(kernel, JITFunction):
        out.append(kernel)
        kernel = kernel.fn
    return out, kernel


def stand_in_args(wrappers, autotuner, jit):
    """Every argument the caller passes: not those the configs or the heuristics set."""
    set_elsewhere = {k for c in autotuner.configs for k in c.kwargs}
    for w in wrappers:
        if isinstance(w, Heuristics):
            set_elsewhere |= set(w.values)
    t = torch.empty(4, dtype=torch.bfloat16)
    kw = {}
    for p in jit.params:
        if p.name in set_elsewhere:
            continue
        if p.is_constexpr:
            kw[p.name] = SHAPES.get(p.name, 1)
        elif p.name in jit.do_not_specialize or p.name in ('T', 'N', 'max_steps', 'tol2', 'scale'):
            kw[p.name] = 1
        else:
            kw[p.name] = t
    return kw


def measure(kernel, number):
    wrappers, jit = layers(kernel)
    autotuner = next(w for w in wrappers if isinstance(w, Autotuner))
    kw = stand_in_args(wrappers, autotuner, jit)
    saved = jit.run, autotuner._bench, autotuner.cache_results
    jit.run = lambda *a, **k: None
    autotuner._bench = lambda *a, config, **k: [float(autotuner.configs.index(config))]
    autotuner.cache_results = False
    try:
        call = (lambda: kernel.run(grid=(1,), warmup=False, **kw))
        call()  # the autotuner's choice, once
        us = timeit.timeit(call, number=number) / number * 1e6
    finally:
        jit.run, autotuner._bench, autotuner.cache_results = saved
    heuristics = sum(len(w.values) for w in wrappers if isinstance(w, Heuristics))
    return len(jit.params), len(kw), len(autotuner.configs), heuristics, us


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--number', type=int, default=5000)
    p.add_argument('--out', default=None)
    args = p.parse_args()
    lines = [
        '| model | kernel | parameters | passed by the caller | configs | heuristics | dispatch µs a launch |',
        '|---|---|---|---|---|---|---|',
    ]
    for model, names in MODULES.items():
        for name in names:
            mod = importlib.import_module(name)
            for attr, obj in sorted(vars(mod).items()):
                if not isinstance(obj, (Autotuner, Heuristics)) or 'kernel' not in attr:
                    continue
                wrappers, _ = layers(obj)
                if not any(isinstance(w, Autotuner) and len(w.configs) > 1 for w in wrappers):
                    continue
                try:
                    n, passed, configs, heur, us = measure(obj, args.number)
                    lines.append(f'| {model} | `{attr}` | {n} | {passed} | {configs} | {heur} | {us:.1f} |')
                except Exception as e:  # a stand-in a prune function cannot take: say so, keep going
                    lines.append(f'| {model} | `{attr}` | | | | | n/a ({type(e).__name__}: {e}) |')
    head = (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
            f"{torch.__version__}, triton {triton.__version__}; the mean of {args.number} calls")
    text = head + '\n\n' + '\n'.join(lines) + '\n'
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)


if __name__ == '__main__':
    main()
