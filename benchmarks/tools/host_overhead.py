# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Where an eager training step's host time goes (issue 13, item 2), on the CPU: each model's forward+backward with
every Triton kernel body skipped, so what is timed is what the host does to enqueue the step (Python, autograd,
fla's and fla-mesa's wrappers, the autotuners' dispatch, aten's dispatch of each op) without the work. Per model
layer: host ms, aten ops that would run a kernel, views and allocations, and Triton launches; the Mesa op alone; and
what the forward saves for the backward (the activations behind peak memory), fla-mesa against fla's MesaNet.

Kernels are skipped by running under Triton's interpreter with its `run` replaced by a counter, so Triton's own GPU
launcher (argument binding, a C call per launch) is not in the times; aten ops run on tiny CPU tensors, cheaper than
a CUDA launch. The numbers rank the parts of a step; the GPU's own enqueue times are in training_h200.md.

    python benchmarks/tools/host_overhead.py [--layers 8] [--out FILE]
    python benchmarks/tools/host_overhead.py --op-only --T 2048     # the op alone, Jacobi against 'auto'
"""

from __future__ import annotations

import os

os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported: kernels go through the (stubbed) interpreter

import argparse  # noqa: E402
import collections  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# aten ops that launch no kernel on a GPU (views, metadata) or only allocate
NO_KERNEL = {'view', 't', 'detach', '_unsafe_view', 'permute', 'unsqueeze', 'squeeze', 'slice', 'select', 'expand',
             'transpose', 'reshape', 'split', 'split_with_sizes', 'as_strided', 'alias', 'new_empty', 'empty',
             'empty_like', 'empty_strided', 'lift_fresh'}
LAUNCHES = collections.Counter()


def skip_kernels():
    from triton.runtime import interpreter

    from tests.interpret import interpret_compat
    interpret_compat()

    def counted(self, *args, grid, warmup, **kwargs):
        LAUNCHES[getattr(self.fn, '__name__', '?')] += 1
    interpreter.InterpretedFunction.run = counted


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def models(L, hidden_size=64, num_heads=2, head_dim=32):
    from fla.models import GLAConfig, GLAForCausalLM, MesaNetConfig, MesaNetForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    from fla_mesa.models import MesaConfig, MesaForCausalLM
    common = dict(hidden_size=hidden_size, num_hidden_layers=L, vocab_size=128)
    fla = dict(common, num_heads=num_heads, fuse_cross_entropy=False, fuse_linear_cross_entropy=False)
    return {
        'fla-mesa': lambda: MesaForCausalLM(MesaConfig(head_dim=head_dim, **fla)),
        'fla-mesanet': lambda: MesaNetForCausalLM(MesaNetConfig(**fla)),
        'fla-gla': lambda: GLAForCausalLM(GLAConfig(**fla)),
        'llama': lambda: LlamaForCausalLM(LlamaConfig(num_attention_heads=2, num_key_value_heads=2, intermediate_size=128,
                                                      attn_implementation='sdpa', **common)),
    }


def host_ms(step, reps):
    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def counted_step(step):
    """One more `step()`, counted: aten ops that run a kernel, views and allocations, Triton launches by kernel."""
    LAUNCHES.clear()
    with CountOps() as counter:
        step()
    kernels = sum(n for op, n in counter.ops.items() if op not in NO_KERNEL)
    return kernels, sum(counter.ops.values()) - kernels, dict(LAUNCHES)


def measure(make, L, T, reps):
    model = make().to(torch.bfloat16).train()
    ids = torch.randint(0, 128, (1, T))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
    ms = host_ms(step, reps)
    kernels, views, launches = counted_step(step)
    return ms / L, kernels / L, views / L, sum(launches.values()) / L


def op_alone(T, reps, precondition=True):
    from fla_mesa.ops.mesa import chunk_mesa
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, 2, 32, generator=g, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gate = (-torch.rand(1, T, 2, generator=g)).requires_grad_()
    beta = torch.rand(1, T, 2, generator=g).requires_grad_()
    lamb = torch.ones(2, 32, requires_grad=True)

    def step():
        chunk_mesa(q, k, v, gate, beta, lamb, check_values=False, precondition=precondition)[0].sum().backward()
    return (host_ms(step, reps), *counted_step(step))


def op_table(T, reps):
    """The Mesa op alone, forward+backward, per `precondition`: host ms, aten ops, Triton launches by kernel."""
    lines = [f"The Mesa op alone (`chunk_mesa` forward+backward, T = {T}, H = 2, K = V = 32), median of {reps}:", "",
             "| precondition | host ms | aten ops (kernels) | views and allocations | Triton launches |",
             "|---|---|---|---|---|"]
    for precondition in (True, 'auto'):
        ms, kernels, views, launches = op_alone(T, reps, precondition)
        names = ', '.join(f'{k} {n}' for k, n in sorted(launches.items()))
        lines.append(f"| {precondition!r} | {ms:.2f} | {kernels} | {views} | {sum(launches.values())}: {names} |")
    return lines


def saved_per_layer(name, T, L=2):
    """
    MiB a layer of what the forward saves for the backward (unique storages; parameters left out), by dtype and
    shape, at the small size of benchmark_training.py (hidden 1024, 8 heads of 128), B = 1: the activations
    behind a training step's peak memory.
    """
    make = models(L, hidden_size=1024, num_heads=8, head_dim=128)[name]
    model = make().to(torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), str(t.dtype)[6:], tuple(t.shape)))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 128, (1, T)))
    by_kind = collections.Counter()
    for nbytes, dtype, shape in saved.values():
        by_kind[f'{dtype} {list(shape)}'] += nbytes
    total = sum(n for n, _, _ in saved.values())
    return total / L / 2**20, {k: v / L / 2**20 for k, v in by_kind.most_common()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--layers', type=int, default=8)
    p.add_argument('--T', type=int, default=128)
    p.add_argument('--reps', type=int, default=9)
    p.add_argument('--out', default=None)
    p.add_argument('--op-only', action='store_true', help="only the Mesa op's table (Jacobi against 'auto')")
    args = p.parse_args()
    skip_kernels()
    torch.manual_seed(0)
    if args.op_only:
        print('\n'.join(op_table(args.T, args.reps)))
        return
    lines = [
        "# Host time of an eager training step, kernels skipped (CPU)", "",
        f"`python benchmarks/tools/host_overhead.py --layers {args.layers} --T {args.T}`; {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "Forward+backward (no optimizer) of a tiny model (hidden 64, 2 heads, vocab 128, bf16, B = 1), median of "
        f"{args.reps}; every Triton kernel body skipped (its docstring says what that leaves out). Per layer:", "",
        "| model | host ms | aten ops (kernels) | views and allocations | Triton launches |", "|---|---|---|---|---|"]
    for name, make in models(args.layers).items():
        ms, kernels, views, launches = measure(make, args.layers, args.T, args.reps)
        lines.append(f"| {name} | {ms:.2f} | {kernels:.1f} | {views:.1f} | {launches:.1f} |")
        print(lines[-1], flush=True)
    lines += [""] + op_table(args.T, args.reps) + ["",
              "What the forward saves for the backward, MiB a layer (unique storages, parameters left out; hidden "
              "1024, 8 heads of 128, T = 2048, B = 1; fla's MesaNet at its default head size, the same here):", ""]
    for name in ('fla-mesa', 'fla-mesanet'):
        total, kinds = saved_per_layer(name, 2048)
        lines.append(f"- {name}: {total:.1f}; " + ', '.join(f'{k} {v:.1f}' for k, v in kinds.items() if v >= 0.5))
    lines.append("")
    text = '\n'.join(lines)
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)


if __name__ == '__main__':
    main()
