# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Data-parallel training of MesaForCausalLM in 2 CPU processes (gloo): every parameter's gradient, at every step,
equals a single process's on the concatenated batch. DDP (flame's `data_parallel_replicate_degree`) and FSDP2
(`fully_shard` per block and at the root, as flame's `apply_fsdp`), so a missing all-reduce, a wrong loss scale, a
parameter outside the wrapped modules or a tied weight reduced twice fails here without a GPU.
"""

import os
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from fla_mesa.models import MesaConfig
from tests.utils import rel_err

WORLD = 2
STEPS = 3
VOCAB = 64
B, T = 2, 24  # per rank; T is not a multiple of the chunk size, so the last chunk is partial

# DDP/FSDP2 and one process differ only in summation order (the batch split in two, gloo's sum, the division by
# 2): a few float32 roundings (docs/flame.md has the measured error); 3x that. Only
# float32: the layer's norms and gates run in float32 whatever the model's dtype, so float64 is no tighter.
TOL = 3e-6


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    # the PyTorch paths on CPU tensors (no Triton interpreter) in this process and in the forked ranks
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    warnings.filterwarnings('ignore', message='.*attention mask.*')


def make_model(tied=False, seed=0):
    config = MesaConfig(
        hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=VOCAB, hidden_ratio=2,
        chunk_size=16, fuse_cross_entropy=False, cg_tol_training=None, cg_max_steps_training=30,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # larger weights than the 0.02 init so that every layer moves the loss
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


def batches(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (WORLD * B, T), generator=gen) for _ in range(STEPS)]


def full(t):
    # FSDP2's parameters and gradients are DTensors sharded over the ranks
    return (t.full_tensor() if hasattr(t, 'full_tensor') else t).detach().clone()


def train(model, rank):
    """
    STEPS SGD steps on this rank's rows of each global batch. Per step: the weights before it, the rank's loss, and
    every parameter's gradient after the reduction. (SGD, not flame's AdamW: only the gradients are compared, each
    against one process at the same weights, and SGD keeps the run short of sign-driven jumps.)
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    for x in batches():
        x = x[rank * B:(rank + 1) * B]
        weights = {name.removeprefix('module.'): full(p) for name, p in model.named_parameters()}
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grads = {name.removeprefix('module.'): full(p.grad) for name, p in model.named_parameters()}
        steps.append((weights, loss.item(), grads))
        opt.step()
    return steps


def single_process(weights, x, tied):
    """The whole batch's loss and gradients in this process, at the given weights."""
    model = make_model(tied)
    model.load_state_dict(weights, strict=False)
    threads = torch.get_num_threads()
    # one thread, like each rank: two would fight the other pytest worker for this machine's cores
    torch.set_num_threads(1)
    try:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def _rank(rank, mode, tied, store, out):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        model = make_model(tied)
        if mode == 'ddp':
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            # a CPU mesh named, not the default: where a GPU is visible that is a CUDA mesh, which moves the shards
            # there
            mesh = init_device_mesh('cpu', (WORLD,))
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            # flame initialises the weights after sharding: every initialiser must work on DTensors
            torch.manual_seed(0)
            model.apply(model._init_weights)
        torch.save(train(model, rank), os.path.join(out, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def run_ranks(mode, tied, tmp_path, timeout=120):
    # fork where it is safe: the ranks reuse this process's imports (seconds instead of a fresh import of fla each).
    # Where a GPU is visible, a backward run before in this process (another test in the same worker) has started
    # autograd's device threads, and a forked rank's backward then fails: spawn there
    method = 'spawn' if torch.cuda.is_available() else 'fork'
    ctx = mp.start_processes(_rank, args=(mode, tied, str(tmp_path / 'store'), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f'{mode}: the ranks did not finish in {timeout} s')
    return [torch.load(tmp_path / f'rank{r}.pt') for r in range(WORLD)]


# FSDP2 untied as in flame's configs; DDP with the input embedding tied to the output head (one parameter, two uses)
@pytest.mark.parametrize('mode, tied', [('ddp', True), ('fsdp2', False)], ids=['ddp-tied', 'fsdp2'])
def test_data_parallel_grads_equal_single_process(mode, tied, tmp_path):
    ranks = run_ranks(mode, tied, tmp_path)
    names = [n for n, _ in make_model(tied).named_parameters()]
    assert ('lm_head.weight' in names) != tied
    worst = 0.0
    for step, x in enumerate(batches()):
        (weights, loss0, got), (weights1, loss1, got1) = ranks[0][step], ranks[1][step]
        assert sorted(got) == sorted(got1) == sorted(weights) == sorted(names), f'{mode}: parameter names {sorted(got)}'
        # the ranks hold the same weights and the same reduced gradients, bit for bit
        for name in names:
            assert torch.equal(weights[name], weights1[name]), f'{mode} step {step} {name}: weights differ between ranks'
            assert torch.equal(got[name], got1[name]), f'{mode} step {step} {name}: gradients differ between ranks'
        if step > 0:
            assert not torch.equal(weights[names[0]], ranks[0][step - 1][0][names[0]]), f'{mode}: no update'
        loss, want = single_process(weights, x, tied)
        # each rank's loss is the mean over its half: their mean is the whole batch's
        assert abs((loss0 + loss1) / WORLD - loss) <= TOL * loss, f'{mode} step {step}: loss {loss0}, {loss1}, {loss}'
        for name in names:
            assert want[name].abs().sum() > 0, f'{name} has no gradient at step {step}'
            err = rel_err(got[name], want[name])
            worst = max(worst, err)
            assert err <= TOL, f'{mode} step {step} {name}: relative error {err:.2e} > {TOL:.0e}'
    print(f'{mode}: worst gradient relative error {worst:.2e}')
