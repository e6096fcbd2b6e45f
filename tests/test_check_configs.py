# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""benchmarks/check_configs.py pins a kernel to each of its GPU configs and measures chunk_mesa against float64."""

import importlib.util
import os

import pytest

from fla_mesa.utils import is_interpreting

pytestmark = pytest.mark.skipif(not is_interpreting(), reason='runs the GPU configs in the Triton interpreter')


def load_tool():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'check_configs.py')
    spec = importlib.util.spec_from_file_location('check_configs', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pins_each_config_and_measures():
    tool = load_tool()
    table = tool.kernels()
    assert set(table) == {'cg', 'states', 'dh', 'dx', 'grads'}
    tuner, configs = table['grads']
    # the GPU list, not the interpreter's single config: these are what the autotuner picks from on a GPU
    assert len(configs) > 1
    last = len(configs) - 1
    saved = {name: list(t.configs) for name, (t, _) in table.items()}
    try:
        errs = tool.run_case('grads', last, 'fp32', 16, 24, T=20)
        assert tuner.configs == [configs[last]]
    finally:
        # the other tests run the interpreter's own configs
        for name, (t, _) in table.items():
            t.configs, t.cache = saved[name], {}
    assert set(errs) == {'o', 'dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb', 'dh0_kk', 'dh0_kv'}
    # float32 inputs, 40 steps at K = 16: converged, fp32 level
    assert max(errs.values()) < 1e-5, errs


def test_pin_config_compiles_only(monkeypatch, capsys):
    # benchmark_chunk.py --pin-config (what warm_cache.py launches): every chunk kernel on config I mod its count,
    # every fla-mesa row run once, no timings
    tool = load_tool()
    table = tool.kernels()
    saved = {name: list(t.configs) for name, (t, _) in table.items()}
    bench_dir = os.path.dirname(os.path.abspath(tool.__file__))
    monkeypatch.syspath_prepend(bench_dir)
    spec = importlib.util.spec_from_file_location('benchmark_chunk', os.path.join(bench_dir, 'benchmark_chunk.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr('sys.argv', ['benchmark_chunk.py', '--pin-config', '4', '--device', 'cpu', '--tokens', '16',
                                     '--Ts', '16', '--H', '1', '--D', '16', '--ops', 'fla-mesa tol', '--no-accuracy'])
    try:
        bench.main()
        pinned = {name: list(t.configs) for name, (t, _) in tool.kernels().items()}
    finally:
        for name, (t, _) in table.items():
            t.configs, t.cache = saved[name], {}
    assert all(pinned[name] == [configs[4 % len(configs)]] for name, (_, configs) in table.items())
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| 16 | fla-mesa tol 1e-4 |')]
    # ran (mean steps reported), timed nothing
    assert len(row) == 1 and row[0].split('|')[3].strip() == 'nan' and '/' in row[0].split('|')[-2], row
