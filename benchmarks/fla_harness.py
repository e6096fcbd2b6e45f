# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Runs fla-mesa's ops in fla's own kernel benchmark harness (`benchmarks/ops` of an fla checkout), beside
fla's `chunk_mesa_net`, without touching the checkout: the ops are registered from here and the harness's
`benchmark_op`/`print_results_table` are called directly (its `main()` would build a git worktree of fla's main
and reinstall fla over the installed wheels).

    python benchmarks/fla_harness.py --fla-root ~/flash-linear-attention --modes fwd fwdbwd
"""

import argparse
import os
import sys

import torch.nn.functional as F


def lamb_transform(t):
    return F.softplus(t) + 0.25


def register(registry):
    from registry import OpConfig, TensorSpec, logsigmoid, shape_BTH, shape_BTHD, shape_HD, sigmoid_transform

    inputs = {
        'q': TensorSpec(shape_BTHD),
        'k': TensorSpec(shape_BTHD),
        'v': TensorSpec(shape_BTHD),
        'g': TensorSpec(shape_BTH, dtype='float32', transform=logsigmoid),
        'beta': TensorSpec(shape_BTH, dtype='float32', transform=sigmoid_transform),
        'lamb': TensorSpec(shape_HD, dtype='float32', transform=lamb_transform),
    }
    # check_values=False: as MesaNet calls the op, no host sync (fla's op checks no values either)
    common = dict(import_path='fla_mesa.ops.mesa', func_name='chunk_mesa', inputs=inputs, category='mesa',
                  dim_constraints={'D': [16, 32, 64, 128]})
    registry.register_op(OpConfig(name='chunk_mesa_30', extra_kwargs=dict(
        cg_max_steps=30, cg_tol=None, use_qk_l2norm_in_kernel=True, check_values=False), **common))
    registry.register_op(OpConfig(name='chunk_mesa_tol1e-4', extra_kwargs=dict(
        cg_max_steps=30, cg_tol=1e-4, use_qk_l2norm_in_kernel=True, check_values=False), **common))
    registry.register_op(OpConfig(
        name='chunk_mesa_net', import_path='fla.ops.mesa_net', inputs=inputs, category='mesa',
        extra_kwargs=dict(max_CG_iteration=30, use_qk_l2norm_in_kernel=True), dim_constraints={'D': [64, 128]},
    ))
    return ['chunk_mesa_30', 'chunk_mesa_tol1e-4', 'chunk_mesa_net']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--fla-root', required=True, help='a checkout of flash-linear-attention (for benchmarks/ops)')
    parser.add_argument('--modes', nargs='+', default=['fwd', 'fwdbwd'])
    parser.add_argument('--shapes', nargs='+', default=['B4_T2048_H16_D128', 'B2_T16384_H16_D128'],
                        help="names from the harness's SHAPE_CONFIGS")
    args = parser.parse_args()

    sys.path.insert(0, os.path.join(args.fla_root, 'benchmarks', 'ops'))
    import registry
    import run

    ops = register(registry)
    shapes = {name: registry.SHAPE_CONFIGS[name] for name in args.shapes}
    results = []
    for op in ops:
        results += run.benchmark_op(op, shapes, modes=args.modes)
    run.print_results_table(results, run._get_machine_info())


if __name__ == '__main__':
    main()
