# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""scripts/upstream.py on the CPU: fla-mesa written into a copy of the installed fla as fla's MesaNet, then imported
from there and run (fla's own tests need a GPU: benchmarks/results/upstream_fla_tests_h200.md)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fla

ROOT = Path(__file__).resolve().parents[1]

CHECK = r'''
import sys, torch, fla
assert fla.__file__.startswith(sys.argv[1]), fla.__file__
from fla.ops.mesa_net import chunk_mesa_net, mesa_net_decoding_one_step, naive_mesa_net_exact
from fla.models import MesaNetConfig, MesaNetForCausalLM
from fla.layers import MesaNet
import fla.ops.mesa_net.chunk as chunk
assert 'chunk_mesa' in vars(chunk), 'the op was not replaced'
config = MesaNetConfig(hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=1, vocab_size=64)
assert config.model_type == 'mesa_net'
model = MesaNetForCausalLM(config)
ids = torch.randint(0, 64, (1, 20))
out = model(input_ids=ids, labels=ids)
assert torch.isfinite(out.loss), out.loss
out.loss.backward()
print('OK', type(model.model.layers[0].attn).__module__)
'''


def test_writes_fla_mesa_into_an_fla_copy_that_imports_and_runs(tmp_path):
    checkout = tmp_path / 'fla'
    shutil.copytree(Path(fla.__file__).parent, checkout / 'fla', ignore=shutil.ignore_patterns('__pycache__'))
    utils = checkout / 'tests/models/test_modeling_utils.py'
    utils.parent.mkdir(parents=True)
    lists = 'MODELING_UNSUPPORTED_VARLEN = [\n    "ABCConfig", {}"SambaConfig",\n]\nOTHER = ["MesaNetConfig"]\n'
    utils.write_text(lists.format('"MesaNetConfig", '))
    # the model's CPU path (PyTorch), not Triton's interpreter, which fla's kernels need tests/interpret.py for
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'TRITON_INTERPRET')}
    run = subprocess.run([sys.executable, str(ROOT / 'scripts/upstream.py'), '--fla', str(checkout)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # fla's model tests then check varlen and the backward of MesaNet too; other lists are left alone
    assert utils.read_text() == lists.format('')
    assert not any('fla_mesa' in p.read_text() for p in (checkout / 'fla').rglob('*.py') if 'mesa' in str(p))
    check = subprocess.run([sys.executable, '-c', CHECK, str(checkout)], capture_output=True, text=True,
                           env={**env, 'PYTHONPATH': str(checkout)}, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split()[-2:] == ['OK', 'fla.layers.mesa_net']
