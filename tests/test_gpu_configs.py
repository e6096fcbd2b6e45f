# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The chunk kernels pinned to their GPU autotune configs (tests/gpu_configs.py), in the interpreter, against float64."""

import pytest

from fla_mesa.utils import is_interpreting
from tests.gpu_configs import config_errors, gpu_configs
from tests.utils import FP32_FLOOR, poison_empty

pytestmark = pytest.mark.skipif(not is_interpreting(), reason='runs the GPU configs in the Triton interpreter')


@pytest.fixture
def table():
    table = gpu_configs()
    saved = {name: list(t.configs) for name, (t, _) in table.items()}
    yield table
    # the other tests run the interpreter's own configs
    for name, (t, _) in table.items():
        t.configs = saved[name]
        t.cache.clear()


def test_pins_each_config_and_measures(table):
    assert set(table) == {'cg', 'cg_bwd', 'states', 'dh', 'o', 'grads'}
    tuner, configs = table['grads']
    # the GPU list, not the interpreter's single config: these are what the autotuner picks from on a GPU
    assert len(configs) > 1
    last = len(configs) - 1
    errs = config_errors('grads', last, 'fp32', 16, 24, T=20)
    assert tuner.configs == [configs[last]]
    assert all(t.configs == [c[0]] for name, (t, c) in table.items() if name != 'grads')
    assert set(errs) == {'o', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb', 'dh0_kk', 'dh0_kv'}
    # float32 inputs, 40 steps at K = 16: converged, a few float32 ulps (the float64 reference has no error of its own
    # here to scale a bound from)
    assert max(errs.values()) < 3 * FP32_FLOOR, errs


def test_every_kernel_on_one_config_index(table):
    # what benchmark_chunk.py --pin-config I compiles: every chunk kernel on its config I mod its count
    errs = config_errors('cg', 4, 'fp32', 16, 16, T=16, others=4)
    assert all(t.configs == [c[4 % len(c)]] for t, c in table.values())
    assert max(errs.values()) < 3 * FP32_FLOOR, errs


@pytest.mark.parametrize('scale', [1.0, 1e-8])
def test_grads_slices_of_a_wider_config(table, monkeypatch, scale):
    # a config whose slices are wider than the narrowest one launches fewer slices than the host made room for: the
    # kernel zeroes the other shares of dg, dβ. Every buffer the op leaves uninitialised starts as NaN here, so a share
    # nobody wrote shows in dg and dβ.
    from fla_mesa.ops.mesa.chunk_bwd import GRADS_MIN_BLOCK
    _, configs = table['grads']
    assert all(min(c.kwargs['BK'], c.kwargs['BV']) >= GRADS_MIN_BLOCK for c in configs)
    wide = next(i for i, c in enumerate(configs) if c.kwargs['BK'] > GRADS_MIN_BLOCK and c.kwargs['BV'] > GRADS_MIN_BLOCK)
    poison_empty(monkeypatch)
    errs = config_errors('grads', wide, 'fp32', 40, 36, T=20, scale=scale)
    assert max(errs.values()) < 3 * FP32_FLOOR, errs


def test_slices_cover_every_config(table):
    # the compile passes' split (benchmarks/warm_cache.py, benchmark_training.py): N processes, each with every
    # autotuned kernel of fla and fla-mesa cut to its configs I, I + N, ...: none empty, together all of them
    from tests.gpu_configs import slice_configs
    tuners, _ = zip(*table.values())
    for tuner, (_, configs) in zip(tuners, table.values()):
        tuner.configs = list(configs)
    full = [list(t.configs) for t in tuners]
    n, seen = 3, [set() for _ in tuners]
    for i in range(n):
        for t, configs in zip(tuners, full):
            t.configs = list(configs)
        assert slice_configs(i, n) >= len(tuners)
        for t, s, configs in zip(tuners, seen, full):
            assert 1 <= len(t.configs) <= -(-len(configs) // n)
            s.update(configs.index(c) for c in t.configs)
    assert all(s == set(range(len(configs))) for s, configs in zip(seen, full))
