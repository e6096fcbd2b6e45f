# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
What `mqar.py` and `byte_lm.py` share: the models (same width, depth and heads, the MLP's width set so that every
model has the parameter count of fla-mesa's MesaNet), the training-health record, the optimiser and schedule, and
a runner that trains several small models at once on one GPU, one process each, with a per-run JSON cache.

Models (`MODELS`):
    mesa            fla-mesa's MesaNet (`fla_mesa.models.MesaForCausalLM`)
    gla             the same with `use_solver=False` (q* = q: gated linear attention)
    fla_mesa_net    fla's MesaNet (`fla.models.MesaNetForCausalLM`)
    deltanet        fla's DeltaNet
    gated_deltanet  fla's gated DeltaNet (fla refuses its backward on Hopper with Triton < 3.7.1: recorded 'refused')
    transformer     transformers' Llama with torch sdpa attention (fla's attention layer needs flash-attn)
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings

import torch

# the checkout's fla_mesa when it is not installed
sys.path.append(os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..')))
warnings.filterwarnings('ignore', message='.*Triton is not supported.*')

MODELS = ('mesa', 'gla', 'fla_mesa_net', 'deltanet', 'gated_deltanet', 'transformer')
LABELS = {
    'mesa': 'MesaNet (fla-mesa)',
    'gla': 'GLA (fla-mesa, no solve)',
    'fla_mesa_net': "fla's MesaNet",
    'deltanet': "fla's DeltaNet",
    'gated_deltanet': "fla's gated DeltaNet",
    'transformer': 'Transformer (sdpa)',
}
# models built from fla's layers: on a CPU their Triton kernels only run under the Triton interpreter
FLA_TRITON_MODELS = ('fla_mesa_net', 'deltanet', 'gated_deltanet')
# fla refuses the gated backward on Hopper with Triton >= 3.4, < 3.7.1 with this message (fla/ops/common/chunk_o.py)
REFUSAL_MARK = 'produces incorrect results for'
# a worker's exit status when it stopped at its deadline after saving a checkpoint (no result yet: resumes next run)
PAUSED = 75
# CG step counts above this are counted here (the solver's default cap is 30)
CG_BINS = 64


def _config(name, vocab_size, hidden_size, num_layers, head_dim, intermediate_size, max_len, on_gpu,
            cg_max_steps, cg_tol, mesa_config):
    if name not in MODELS:
        raise ValueError(f'model must be one of {MODELS}, got {name!r}')
    if hidden_size % head_dim:
        raise ValueError(f'hidden_size ({hidden_size}) must be a multiple of head_dim ({head_dim})')
    num_heads = hidden_size // head_dim
    # the models compute their loss from the hidden states here (fla's fused loss needs a GPU); fla's fused norm
    # and SwiGLU kernels run on GPUs, the PyTorch versions elsewhere
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        intermediate_size=intermediate_size, max_position_embeddings=max_len, tie_word_embeddings=False,
        use_cache=False,
    )
    fla_common = dict(common, fuse_norm=on_gpu, fuse_swiglu=on_gpu, fuse_cross_entropy=False)
    if name in ('mesa', 'gla'):
        from fla_mesa.models import MesaConfig, MesaForCausalLM
        settings = dict(fla_common, num_heads=num_heads, head_dim=head_dim, use_solver=name == 'mesa',
                        cg_max_steps_training=cg_max_steps, cg_tol_training=cg_tol,
                        cg_max_steps_inference=cg_max_steps, cg_tol_inference=cg_tol)
        return MesaForCausalLM, MesaConfig(**{**settings, **(mesa_config or {})})
    if name == 'fla_mesa_net':
        from fla.models import MesaNetConfig, MesaNetForCausalLM
        return MesaNetForCausalLM, MesaNetConfig(
            num_heads=num_heads, head_dim=head_dim, max_cg_step_training=cg_max_steps,
            max_cg_step_decoding=cg_max_steps, **fla_common,
        )
    if name == 'deltanet':
        from fla.models import DeltaNetConfig, DeltaNetForCausalLM
        return DeltaNetForCausalLM, DeltaNetConfig(num_heads=num_heads, expand_k=1.0, expand_v=1.0, **fla_common)
    if name == 'gated_deltanet':
        from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
        # expand_v=1: the same state size as the other models
        return GatedDeltaNetForCausalLM, GatedDeltaNetConfig(
            num_heads=num_heads, head_dim=head_dim, expand_v=1.0, **fla_common,
        )
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM, LlamaConfig(
        num_attention_heads=num_heads, num_key_value_heads=num_heads, head_dim=head_dim,
        attn_implementation='sdpa', **common,
    )


def build_model(name, *, vocab_size, hidden_size, num_layers, head_dim, intermediate_size=None, max_len=2048,
                on_gpu=True, cg_max_steps=30, cg_tol=1e-4, mesa_config=None):
    """One causal LM of `MODELS`, on the current default device, float32 weights; `mesa_config`: `MesaConfig`
    settings for fla-mesa's models (MesaNet and GLA), over the defaults here."""
    cls, config = _config(name, vocab_size, hidden_size, num_layers, head_dim, intermediate_size, max_len, on_gpu,
                          cg_max_steps, cg_tol, mesa_config)
    # under TRITON_INTERPRET=1 (CPU smoke tests) fla's kernels need this; it does nothing otherwise
    from tests.interpret import interpret_compat
    interpret_compat()
    if name == 'transformer':
        return cls._from_config(config, attn_implementation='sdpa')
    return cls(config)


def reference_intermediate_size(hidden_size, hidden_ratio=4):
    """fla's GatedMLP default width, the one fla-mesa's MesaNet gets."""
    return 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)


def count_params(name, **kwargs) -> int:
    with torch.device('meta'):
        return sum(p.numel() for p in build_model(name, **kwargs).parameters())


def matched_sizes(names, **kwargs) -> dict:
    """
    For each model, the MLP width that brings its parameter count to fla-mesa's MesaNet's (with fla's default MLP),
    and the count it gets. A count is linear in the MLP width, so two counts on the meta device solve it.
    """
    target = count_params('mesa', intermediate_size=reference_intermediate_size(kwargs['hidden_size']), **kwargs)
    sizes = {}
    for name in names:
        p0, p1 = (count_params(name, intermediate_size=i, **kwargs) for i in (64, 128))
        width = max(8, round((64 + (target - p0) * 64 / (p1 - p0)) / 8) * 8)
        params = count_params(name, intermediate_size=width, **kwargs)
        sizes[name] = dict(intermediate_size=width, params=params, target=target)
        if abs(params - target) > 0.05 * target:
            raise ValueError(f'{name}: {params} parameters, more than 5% from the target {target}')
    return sizes


def final_hidden(model, input_ids):
    """The last layer's normalised hidden states (every model here has `.model` and `.lm_head`)."""
    return model.model(input_ids=input_ids, use_cache=False).last_hidden_state


def cg_steps(model):
    """The CG steps of the last forward of every fla-mesa Mesa layer that solves, `[L, B, T, H]` (else None)."""
    layers = getattr(model.model, 'layers', [])
    attns = [getattr(layer, 'attn', None) for layer in layers]
    steps = [getattr(a, 'last_cg_steps', None) for a in attns if getattr(a, 'use_solver', False)]
    steps = [s for s in steps if s is not None]
    return torch.stack([s.float() for s in steps]) if steps else None


def cg_histogram():
    """Counts of tokens (per head and layer) by CG steps taken: exact quantiles in constant memory."""
    return torch.zeros(CG_BINS, dtype=torch.long)


def accumulate_cg(model, hist):
    """Adds the last forward's CG steps of `model` to `hist` (nothing for a model without a solve)."""
    steps = cg_steps(model)
    if steps is not None:
        hist += torch.bincount(steps.flatten().long().clamp(max=CG_BINS - 1), minlength=CG_BINS).cpu()


def cg_quantiles(hist):
    """Mean and 99th percentile of the CG steps counted in `hist` (None if empty)."""
    hist = hist.double()
    total = hist.sum()
    if total == 0:
        return None
    mean = (hist * torch.arange(len(hist), dtype=torch.double)).sum() / total
    p99 = int(torch.searchsorted(hist.cumsum(0) / total, torch.tensor(0.99, dtype=torch.double)))
    return dict(mean=mean.item(), p99=p99)


def make_optimizer(model, lr, steps, warmup, weight_decay=0.1):
    """AdamW with linear warm-up then cosine decay to 10% (no weight decay on norms, biases and Λ)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Health:
    """Non-finite losses and gradients (the step is skipped), the largest gradient norm and its largest spike."""

    window = 100

    def __init__(self):
        self.nonfinite_loss = 0
        self.nonfinite_grad = 0
        self.max_grad_norm = 0.0
        self.max_spike = 0.0       # a step's grad norm over the median of the previous `window` steps' norms
        self.max_spike_step = -1
        self.recent = []

    def check(self, step, loss, grad_norm) -> bool:
        """Records one step; False if it must be skipped."""
        if not math.isfinite(loss):
            self.nonfinite_loss += 1
            return False
        if not math.isfinite(grad_norm):
            self.nonfinite_grad += 1
            return False
        self.max_grad_norm = max(self.max_grad_norm, grad_norm)
        if len(self.recent) >= 10:
            spike = grad_norm / max(sorted(self.recent)[len(self.recent) // 2], 1e-12)
            if spike > self.max_spike:
                self.max_spike, self.max_spike_step = spike, step
        self.recent = (self.recent + [grad_norm])[-self.window:]
        return True

    def state_dict(self):
        return {k: v for k, v in vars(self).items()}

    def load_state_dict(self, state):
        vars(self).update(state)

    def summary(self):
        return dict(nonfinite_loss=self.nonfinite_loss, nonfinite_grad=self.nonfinite_grad,
                    max_grad_norm=self.max_grad_norm, max_grad_spike=self.max_spike,
                    max_grad_spike_step=self.max_spike_step)


def training_step(model, opt, sched, health, step, loss_fn, inputs, amp, clip=1.0):
    """
    One optimiser step on `loss_fn(model, *inputs)` in bf16 autocast (weights and optimiser in float32); returns
    the loss.
    """
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        loss = loss_fn(model, *inputs)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    loss_value, grad_value = loss.item(), grad_norm.item()
    if health.check(step, loss_value, grad_value):
        opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return loss_value


def failure_record(exc: BaseException) -> dict:
    text = ''.join(traceback.format_exception(exc))
    status = 'refused' if REFUSAL_MARK in text else 'failed'
    return dict(status=status, error=f'{type(exc).__name__}: {exc}'[:2000], traceback=text[-4000:])


def write_json(path, record):
    """Atomically (a run cut while writing leaves no half file)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def pin_mesa_kernels():
    """
    fla-mesa's chunk kernels each pinned to their first GPU autotune config: a dozen workers compiling every config
    of every kernel at once took minutes of a call; every config is checked against float64
    (benchmarks/tools/check_configs.py), so the choice changes speed only. `--autotune` keeps the autotuners.
    """
    from tests.gpu_configs import pin_all
    pin_all(0)


def _at_least_one(text):
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {n}')
    return n


def add_kernel_options(parser):
    """The scripts' options for the Triton kernels of their workers (see `run_worker`)."""
    parser.add_argument('--autotune', action='store_true',
                        help="autotune fla-mesa's chunk kernels (default on a GPU: each pinned to its first config)")
    parser.add_argument('--fla-config-share', type=_at_least_one, default=1, metavar='N',
                        help='on a GPU, every fla kernel autotunes over every N-th of its configs (fewer to compile)')


def add_model_options(parser):
    """The scripts' options for the models (ablations: a changed setting gets its own cache folder)."""
    parser.add_argument('--mesa-config', nargs='+', type=_mesa_setting, action=_AsDict, default={}, metavar='KEY=VALUE',
                        help="MesaConfig settings for fla-mesa's models, MesaNet and GLA (e.g. use_gamma_cap=False "
                             "precondition=True; values as Python literals)")


def model_settings(args) -> dict:
    """What `add_model_options` adds to a script's cache settings: nothing at the defaults, so their folders stay."""
    return {'mesa_config': args.mesa_config} if args.mesa_config else {}


def model_report_lines(args) -> list:
    """The report's line on `add_model_options`' settings (none at the defaults)."""
    if not args.mesa_config:
        return []
    return [f"fla-mesa's models (MesaNet, GLA) with `{json.dumps(args.mesa_config)}`.", '']


class _AsDict(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


def _mesa_setting(item):
    from fla_mesa.models import MesaConfig
    key, sep, value = item.partition('=')
    if not sep or key not in inspect.signature(MesaConfig.__init__).parameters:
        raise argparse.ArgumentTypeError(f'{item!r}: give KEY=VALUE with KEY a MesaConfig argument')
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a plain string, as 'auto'
    return key, value


def share_fla_configs(share):
    """
    Every autotuned kernel of fla keeps every `share`-th of its configs (0, share, 2 share, ...): fla's kernels carry
    dozens of configs each, all compiled at the first call in every worker, which on a fresh machine took the
    workers longer than training. Any config computes the same function; the choice changes speed only.
    """
    from tests.gpu_configs import loaded_autotuners
    for tuner in loaded_autotuners(prefixes=('fla.',)):
        tuner.configs = tuner.configs[::share]
        tuner.cache.clear()


def run_worker(cell_json, train):
    """A worker process's whole job: train the cell, record the result (or why it failed) in the cell's cache."""
    cell = json.loads(cell_json)
    if cell['device'] == 'cuda' and cell.get('fla_config_share', 1) > 1:
        share_fla_configs(cell['fla_config_share'])
    if cell['device'] == 'cuda' and cell['model'] in ('mesa', 'gla') and not cell.get('autotune'):
        pin_mesa_kernels()
    try:
        record = train(cell)
    except Exception as exc:  # recorded in the cell's cache so the report says why (fla's refusal included)
        record = failure_record(exc)
    record['cell'] = cell
    record['environment'] = environment()
    write_json(cell['result'], record)


def worker_env(model, device):
    """
    On a CPU fla's models need the Triton interpreter, while fla-mesa's and the Transformer run in PyTorch
    (fla-mesa would run its Triton kernels in the interpreter too, far slower).
    """
    env = dict(os.environ)
    if device == 'cpu':
        if model in FLA_TRITON_MODELS:
            env['TRITON_INTERPRET'] = '1'
        else:
            env.pop('TRITON_INTERPRET', None)
    return env


def visible_gpus(device):
    """The GPUs to spread worker processes over (their CUDA_VISIBLE_DEVICES values), or None for one device."""
    if device != 'cuda':
        return None
    import torch
    count = torch.cuda.device_count()
    if count < 2:
        return None
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    return visible.split(',')[:count] if visible else [str(i) for i in range(count)]


def run_jobs(jobs, parallel, desc, time_limit=None, job_timeout=None, gpus=None):
    """
    Runs `jobs` (dicts: key, argv, env, log, result) `parallel` at a time, one process each, with a progress bar;
    with `gpus` (CUDA_VISIBLE_DEVICES values) each process gets the one running the fewest at its start.
    A job whose process ends without writing its result gets a 'failed' record with its log's tail, unless it
    exits with `PAUSED` (checkpointed at its deadline; nothing is recorded, the next run resumes it). After
    `time_limit` seconds no new job starts (the running ones finish); returns the number left unstarted. A job
    running past `job_timeout` seconds is killed and recorded as failed (a hung kernel must not stall the grid).
    """
    from tqdm.auto import tqdm

    pending, running = list(jobs), []
    bar = tqdm(total=len(jobs), desc=desc, dynamic_ncols=True)
    start_all = time.time()
    try:
        while pending or running:
            if time_limit is not None and time.time() - start_all > time_limit:
                pending = []
            while pending and len(running) < parallel:
                job = pending.pop(0)
                os.makedirs(os.path.dirname(job['log']), exist_ok=True)
                log = open(job['log'], 'w')
                env = job['env']
                if gpus:
                    gpu = min(gpus, key=lambda g: sum(item[4] == g for item in running))
                    env = dict(env, CUDA_VISIBLE_DEVICES=gpu)
                proc = subprocess.Popen(job['argv'], stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((job, proc, log, time.time(), env.get('CUDA_VISIBLE_DEVICES')))
            time.sleep(0.5)
            for item in list(running):
                job, proc, log, start, _ = item
                if proc.poll() is None:
                    if job_timeout is not None and time.time() - start > job_timeout:
                        proc.kill()
                        proc.wait()
                        write_json(job['result'], dict(status='failed', error=f'killed after {job_timeout:g} s',
                                                       traceback=''))
                    else:
                        continue
                running.remove(item)
                log.close()
                record = read_json(job['result'])
                if record is None and proc.returncode == PAUSED:
                    record = dict(status='paused')
                elif record is None:
                    with open(job['log']) as f:
                        tail = f.read()[-3000:]
                    record = dict(status='failed', error=f'process exited with {proc.returncode}', traceback=tail)
                    write_json(job['result'], record)
                bar.update(1)
                bar.set_postfix_str(f"{job['key']}: {record.get('status')} ({time.time() - start:.0f}s)")
        return bar.total - bar.n
    finally:
        for _, proc, log, _, _ in running:
            proc.terminate()
            log.close()
        bar.close()


def environment():
    """Versions and device, for the result files."""
    import fla
    import transformers
    import triton
    info = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
                fla=getattr(fla, '__version__', '?'), transformers=transformers.__version__)
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    # $COMMIT first, as the other benchmarks take it: a copied checkout's git metadata can lag its files
    info['commit'] = os.environ.get('COMMIT', '')
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        info['commit'] = info['commit'] or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=here,
                                                          capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        pass
    return info
