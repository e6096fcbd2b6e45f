# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The chunk kernels' GPU autotune configs, one at a time: pinned under the interpreter by the tests, and on a GPU by
benchmarks/tools/check_configs.py (every config against float64) and the benchmarks' compile passes, which also
split every autotuned kernel's configs (fla's too) between their processes (`slice_configs`).
"""

import sys

import torch
import triton

DTYPES = {'bf16': torch.bfloat16, 'fp32': torch.float32}
GRAD_NAMES = ['o', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb', 'dh0_kk', 'dh0_kv']


def autotuner(kernel):
    """The autotuner under a kernel's heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.autotuner.Autotuner):
        kernel = kernel.fn
    return kernel


def gpu_configs():
    """name -> (the kernel's autotuner, its GPU config list); the interpreter's own lists hold one config each."""
    from fla_mesa.ops.mesa import chunk_bwd, chunk_cg, chunk_h, chunk_o

    def gpu_list(module, fn):
        interpreting = module.is_interpreting
        module.is_interpreting = lambda: False
        try:
            return fn()
        finally:
            module.is_interpreting = interpreting

    return {
        'cg': (autotuner(chunk_cg.chunk_mesa_fwd_kernel_cg), gpu_list(chunk_cg, chunk_cg._cg_configs)),
        'cg_bwd': (autotuner(chunk_cg.chunk_mesa_bwd_kernel_cg), gpu_list(chunk_cg, chunk_cg._cg_configs)),
        'states': (autotuner(chunk_h.chunk_mesa_fwd_kernel_h), gpu_list(chunk_h, chunk_h.state_configs)),
        'dh': (autotuner(chunk_h.chunk_mesa_bwd_kernel_dh), gpu_list(chunk_h, chunk_h.state_configs)),
        'o': (autotuner(chunk_o.chunk_mesa_kernel_o), gpu_list(chunk_o, chunk_o._configs)),
        'grads': (autotuner(chunk_bwd.chunk_mesa_bwd_kernel_grads), gpu_list(chunk_bwd, chunk_bwd._grads_configs)),
    }


def pin(kernel, config):
    """Pins an autotuned kernel (under its heuristics) to one config; returns a function that restores it."""
    tuner = autotuner(kernel)
    saved = tuner.configs
    tuner.configs = [config]
    tuner.cache.clear()

    def restore():
        tuner.configs = saved
        tuner.cache.clear()
    return restore


def pin_all(index):
    """Every fla-mesa chunk kernel pinned to its GPU config `index` (mod its count), as the benchmarks' runs do."""
    for tuner, configs in gpu_configs().values():
        pin(tuner, configs[index % len(configs)])


def loaded_autotuners(prefixes=('fla.', 'fla_mesa.')):
    """
    Every autotuned Triton kernel (its autotuner, under any heuristics wrappers) of the loaded modules whose names
    start with one of `prefixes`, each once; fla's and fla-mesa's kernel modules are imported first.
    """
    import fla  # noqa: F401  (imports every fla kernel module)
    import fla_mesa.layers  # noqa: F401
    import fla_mesa.models  # noqa: F401
    import fla_mesa.ops.mesa  # noqa: F401
    found = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        for obj in list(vars(module).values()):
            while obj is not None and not isinstance(obj, triton.runtime.autotuner.Autotuner) and hasattr(obj, 'fn'):
                obj = obj.fn
            if isinstance(obj, triton.runtime.autotuner.Autotuner):
                found.setdefault(id(obj), obj)
    return list(found.values())


def slice_configs(i, n):
    """
    Every autotuned Triton kernel of fla and fla-mesa keeps its configs i, i + n, i + 2n, ... (its config i mod its
    count where it has fewer than i + 1): a compile pass's n processes split the compiling between them,
    together covering every config. Returns the number of kernels sliced.
    """
    tuners = loaded_autotuners()
    for tuner in tuners:
        tuner.configs = tuner.configs[i::n] or [tuner.configs[i % len(tuner.configs)]]
        tuner.cache.clear()
    return len(tuners)


def describe(config):
    return ' '.join(f'{k}={v}' for k, v in config.kwargs.items()) + f' w{config.num_warps} s{config.num_stages}'


def config_errors(kernel, index, dtype, K, V, T=130, device=None, others=0, scale=1.0):
    """
    Relative errors of o and every gradient of chunk_mesa against float64 on the same rounded inputs, with `kernel`
    pinned to its GPU config `index` and every other chunk kernel to its config `others` (mod its count). The pins
    stay (check_configs.py runs one case a process).
    """
    from fla_mesa.ops.mesa import chunk_mesa
    from fla_mesa.utils import is_interpreting
    from tests.utils import make_inputs, rel_err

    device = device or ('cpu' if is_interpreting() else 'cuda')
    if is_interpreting():
        from tests import bounds
        from tests.interpret import interpret_compat
        interpret_compat()
        bounds.install()
    for name, (tuner, configs) in gpu_configs().items():
        pin(tuner, configs[(index if name == kernel else others) % len(configs)])
    q, k, v, g, beta, lamb, h0 = make_inputs(1, T, 2, K, V, gate=(5.0, 1.0), initial_state=True, seed=K + V)
    q, k, v = (t.to(DTYPES[dtype]).double() for t in (q, k, v))
    do = torch.randn(1, T, 2, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the upstream gradient's scale (the gradients' relative accuracy must not depend on it)
    do = do.to(DTYPES[dtype]).double() * scale
    # the output kernel serves both its uses without a solve (cg_max_steps = 0: x = q): the readout and dx
    steps = 0 if kernel == 'o' else 40

    def run(dev, qkv_dtype, dtype):
        leaves = [t.to(dev, qkv_dtype, copy=True).requires_grad_() for t in (q, k, v)]
        leaves += [t.to(dev, dtype, copy=True).requires_grad_() for t in (g, beta, lamb)]
        state = tuple(h.to(dev, dtype, copy=True).requires_grad_() for h in h0)
        o, _ = chunk_mesa(*leaves, initial_state=state, cg_max_steps=steps, cg_tol=None, check_values=False)
        (o * do.to(dev, o.dtype)).sum().backward()
        return [o] + [t.grad for t in leaves + list(state)]

    out = run(device, DTYPES[dtype], torch.float32)
    ref = run('cpu', torch.float64, torch.float64)
    names = GRAD_NAMES
    if steps == 0:
        names, out, ref = names[:6] + names[7:], out[:6] + out[7:], ref[:6] + ref[7:]
    return {n: rel_err(a, b) for n, a, b in zip(names, out, ref)}
