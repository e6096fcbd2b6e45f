# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
A whole training step of MesaForCausalLM (forward, backward, AdamW) captured in one CUDA graph and replayed: the
way to train without the eager step's host launch overhead (benchmarks/results/training_h200.md). GPU only.
"""

import copy

import pytest
import torch

from fla_mesa.models import MesaConfig, MesaForCausalLM
from tests.utils import ON_GPU, assert_rel

pytestmark = pytest.mark.skipif(not ON_GPU, reason='CUDA graphs need a GPU')

VOCAB = 128


def eager_step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.detach()


def test_graphed_training_step_equals_eager():
    torch.manual_seed(0)
    # head_dim 32: the float32 kernels at 128 take minutes to compile every autotune config
    config = MesaConfig(hidden_size=64, num_heads=2, head_dim=32, num_hidden_layers=2, vocab_size=VOCAB)
    eager = MesaForCausalLM(config).cuda()
    graphed = copy.deepcopy(eager)
    batches = [torch.randint(0, VOCAB, (2, 200), device='cuda') for _ in range(6)]
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, capturable=True)

    # the first steps run eagerly on both (autotuning happens here, before any capture), on a side stream as
    # PyTorch's whole-network capture recipe asks
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for ids in batches[:3]:
            eager_step(eager, opt_e, ids)
            eager_step(graphed, opt_g, ids)
    torch.cuda.current_stream().wait_stream(side)

    static_ids = batches[3].clone()
    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = graphed(input_ids=static_ids, labels=static_ids).loss
        static_loss.backward()
        opt_g.step()

    before = [p.detach().clone() for p in graphed.parameters()]
    for ids in batches[3:]:
        loss_e = eager_step(eager, opt_e, ids)
        static_ids.copy_(ids)
        graph.replay()
        # the same kernels and configs on the same data: equal up to float32 reordering in the reductions
        assert_rel('loss', static_loss, loss_e, 1e-5)
    for (name, p_e), p_g, p_0 in zip(eager.named_parameters(), graphed.parameters(), before):
        # the replays trained (each weight moved), and as the eager steps did
        assert not torch.equal(p_g, p_0), name
        assert_rel(name, p_g, p_e, 1e-5)
