# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The model with default settings on a CPU without Triton (no GPU, no interpreter): every fused module, the loss too,
falls back to PyTorch; and generate() on it warns about nothing the user did.
"""

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from fla_mesa.models import MesaConfig, MesaForCausalLM


@pytest.fixture
def no_triton(monkeypatch):
    # CI runs every test under TRITON_INTERPRET=1: without it CPU tensors run no Triton, as on a user's CPU machine
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    config = MesaConfig(hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=50, **kwargs)
    return MesaForCausalLM(config)


def loss_and_grads(model, input_ids, labels, reference: bool):
    """The model's loss (or plain `F.cross_entropy` on its logits, shifted as fla shifts labels) and its gradients."""
    model.zero_grad()
    out = model(input_ids=input_ids, labels=None if reference else labels)
    if reference:
        logits = out.logits
        # fla's shift: the last position's label ignored, not dropped (a mean over other rows sums in another order)
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten())
    else:
        loss = out.loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('flags', [
    {},  # the defaults: fuse_norm, fuse_swiglu, fuse_cross_entropy
    {'fuse_linear_cross_entropy': True, 'fuse_cross_entropy': False},
    {'fuse_cross_entropy': False},
], ids=['defaults', 'fused-linear', 'unfused'])
def test_loss_on_cpu_matches_plain_cross_entropy(no_triton, flags):
    model = tiny_model(**flags)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 50, (2, 24), generator=gen)
    loss, grads = loss_and_grads(model, input_ids, input_ids, reference=False)
    ref, ref_grads = loss_and_grads(model, input_ids, input_ids, reference=True)
    assert torch.isfinite(loss) and loss > 0
    # the same float32 operations on the same logits: equal to the bit (measured)
    assert torch.equal(loss, ref)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_generate_on_cpu_warns_nothing(no_triton):
    model = tiny_model().eval()
    input_ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(2))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger('transformers')
    hf_logger.addHandler(handler)
    # transformers logs its deprecations once per process: forget earlier ones, so this call would log them again
    hf_logging.get_logger().warning_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            out = model.generate(input_ids, max_new_tokens=4, do_sample=False)
            model(input_ids)
    finally:
        hf_logger.removeHandler(handler)
    assert out.shape == (1, 12)
    assert not [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning, UserWarning))]
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    # greedy decoding with the cache gives the tokens a full forward picks at every position
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 7:].argmax(-1), out[:, 8:])
