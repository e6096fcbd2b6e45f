# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""The MQAR benchmark's data (benchmarks/quality/mqar.py): its batches answer their own queries, and its training
cycle is the curriculum then every tested pair count."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'quality'))
import mqar  # noqa: E402


@pytest.mark.parametrize('length,pairs', [(64, 4), (512, 128), (128, 32)])
def test_mqar_batch_labels_are_the_values_of_the_asked_keys(length, pairs):
    vocab = 8192
    inputs, labels = mqar.mqar_batch(8, pairs, length, vocab, torch.Generator().manual_seed(0), 'cpu')
    assert inputs.shape == labels.shape == (8, length)
    for row, lab in zip(inputs, labels):
        keys, values = row[0:2 * pairs:2], row[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and int(keys.max()) < vocab // 2 <= int(values.min())
        asked = (lab != -100).nonzero().flatten()
        # every key asked once, after the pairs, and labelled with its own value
        assert len(asked) == pairs and int(asked.min()) >= 2 * pairs
        answer = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(row[asked].tolist()) == sorted(keys.tolist())
        assert all(answer[int(row[t])] == int(lab[t]) for t in asked)


def test_training_schedule_cycles_curriculum_then_tested_pairs():
    assert mqar.training_schedule(['64:4:2', '128:8:1'], [32, 64], 512) == [
        (64, 4), (64, 4), (128, 8), (512, 32), (512, 64)]
    assert mqar.training_schedule([], [32], 512) == [(512, 32)]


@pytest.mark.parametrize('entry', ['64:4', '64:0:1', 'a:4:1', '16:8:1'])
def test_training_schedule_rejects_bad_entries(entry):
    with pytest.raises(ValueError, match=entry):
        mqar.training_schedule([entry], [32], 512)


def test_share_fla_configs_keeps_every_nth(monkeypatch):
    import common
    from tests.gpu_configs import loaded_autotuners
    tuners = loaded_autotuners(prefixes=('fla.',))
    assert tuners
    for tuner in tuners:  # restored after the test: the autotuners are module state
        monkeypatch.setattr(tuner, 'configs', list(tuner.configs))
    before = {id(t): list(t.configs) for t in tuners}
    common.share_fla_configs(4)
    for tuner in tuners:
        assert tuner.configs == before[id(tuner)][::4] and tuner.configs
    # fla-mesa's kernels are left to their own pinning
    mesa = [t for t in loaded_autotuners(prefixes=('fla_mesa.',))]
    assert mesa and all(t not in tuners for t in mesa)


def test_bad_config_share_is_refused():
    with pytest.raises(SystemExit):
        mqar.parse_args(['--fla-config-share', '0'])


def test_report_only_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(mqar, 'RESULTS', str(tmp_path / 'results'))
    cache = tmp_path / 'cache'
    mqar.main(['--tiny', '--report-only', '--models', 'mesa', 'transformer', '--seeds', '0', '1',
               '--cache-dir', str(cache), '--tag', 't'])
    assert not list(cache.rglob('*.json'))
    report = (tmp_path / 'results' / 'mqar_t.md').read_text()
    assert '4 cells not yet run' in report


def test_mesa_config_reaches_the_model_and_the_cache_folder(tmp_path):
    import common
    args = mqar.parse_args(['--tiny', '--cache-dir', str(tmp_path), '--mesa-config', 'use_gamma_cap=False',
                            'precondition=auto', 'cg_tol_training=1e-3'])
    assert args.mesa_config == dict(use_gamma_cap=False, precondition='auto', cg_tol_training=1e-3)
    folder, settings = mqar.cell_dir(args)
    # the default settings keep their folder (earlier caches stay valid); an ablation gets its own
    assert folder != mqar.cell_dir(mqar.parse_args(['--tiny', '--cache-dir', str(tmp_path)]))[0]
    assert 'mesa_config' not in mqar.cell_dir(mqar.parse_args(['--tiny', '--cache-dir', str(tmp_path)]))[1]
    with torch.device('meta'):
        model = common.build_model('mesa', vocab_size=64, hidden_size=32, num_layers=1, head_dim=16,
                                   mesa_config=settings['mesa_config'])
    layer = model.model.layers[0].attn
    assert layer.use_gamma_cap is False and layer.precondition == 'auto' and layer.cg_tol_training == 1e-3


@pytest.mark.parametrize('item', ['no_such_key=1', 'use_gamma_cap'])
def test_bad_mesa_config_is_refused(item):
    with pytest.raises(SystemExit):
        mqar.parse_args(['--mesa-config', item])


def test_run_jobs_spreads_processes_over_gpus(tmp_path):
    # each job records the CUDA_VISIBLE_DEVICES it was given; four at once over two GPUs: two each
    script = ('import json, os, sys, time; time.sleep(1); '
              'json.dump(dict(status="ok", gpu=os.environ.get("CUDA_VISIBLE_DEVICES")), open(sys.argv[1], "w"))')
    jobs = [dict(key=f'j{i}', argv=[sys.executable, '-c', script, str(tmp_path / f'j{i}.json')], env=dict(os.environ),
                 log=str(tmp_path / 'logs' / f'j{i}.log'), result=str(tmp_path / f'j{i}.json')) for i in range(4)]
    assert mqar.common.run_jobs(jobs, 4, 'test', gpus=['3', '5']) == 0
    gpus = sorted(mqar.common.read_json(job['result'])['gpu'] for job in jobs)
    assert gpus == ['3', '3', '5', '5']


def test_visible_gpus_is_none_off_a_multi_gpu_machine():
    assert mqar.common.visible_gpus('cpu') is None
    if torch.cuda.device_count() < 2:
        assert mqar.common.visible_gpus('cuda') is None
