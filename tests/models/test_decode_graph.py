# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
The CUDA-graph decode step (`MesaDecodeGraph`, `MesaConfig(decode_cuda_graph=True)`): on the CPU its step run
eagerly (`capture=False`) on static buffers, against the plain eager step (the same logits and states, to the bit;
the cache advanced in place; a second cache hands the first its own copy back); the mask dropped after the prefill;
on a GPU the captured graph inside `generate()` against eager `generate()`.
"""

import copy
import os
import warnings

import pytest
import torch

from fla_mesa.models.mesa_net.decode_graph import MesaDecodeGraph
from tests.interpret import interpret_compat
from tests.models.test_modeling_mesa import make_model, tokens
from tests.utils import ON_GPU

INTERPRETING = os.environ.get('TRITON_INTERPRET', '0') == '1'


TRITON = pytest.param('triton', marks=pytest.mark.skipif(
    not INTERPRETING, reason='the Triton path on the CPU: needs TRITON_INTERPRET=1 at start-up'))


@pytest.fixture(autouse=True)
def paths(request, monkeypatch):
    # the PyTorch paths, and the Triton ones (the kernels a GPU graph captures: fla's short conv updates its window
    # in place, the recurrent kernel writes new states) under the interpreter
    warnings.filterwarnings('ignore', message='.*attention mask.*')
    path = getattr(request, 'param', 'torch')
    if path == 'torch':
        monkeypatch.setenv('TRITON_INTERPRET', '0')
    else:
        interpret_compat()
    return path


def states(cache):
    return [t for i in range(len(cache)) for t in (*cache[i]['recurrent_state'], *cache[i]['conv_state'])]


def prefill(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return out.logits[:, -1:].argmax(-1), out.past_key_values


@pytest.mark.parametrize('paths', ['torch', TRITON], indirect=True)
def test_static_step_equals_eager(paths):
    model = make_model().eval()
    nxt, cache = prefill(model, tokens(B=2, T=9))
    eager_cache = copy.deepcopy(cache)
    graph = MesaDecodeGraph(model, cache, capture=False)
    buffers = [b.data_ptr() for layer in graph.buffers for b in layer]
    seen = cache.get_seq_length()
    x = y = nxt
    for step in range(3 if paths == 'torch' else 2):
        with torch.no_grad():
            ref = model(input_ids=x, past_key_values=eager_cache, use_cache=True).logits
        logits = graph.step(y, cache)
        # the same forward on the same numbers: equal to the bit
        assert torch.equal(logits, ref), step
        assert all(torch.equal(a, b) for a, b in zip(states(cache), states(eager_cache)))
        # the cache holds the buffers themselves, advanced in place; its token count follows
        assert [t.data_ptr() for t in states(cache)] == buffers
        assert cache.get_seq_length() == seen + step + 1
        x = y = ref.argmax(-1)


def test_second_cache_gets_its_own_state_back():
    model = make_model().eval()
    nxt_a, cache_a = prefill(model, tokens(B=2, T=9, seed=1))
    nxt_b, cache_b = prefill(model, tokens(B=2, T=5, seed=2))
    graph = MesaDecodeGraph(model, cache_a, capture=False)
    graph.step(nxt_a, cache_a)
    after_one = [t.clone() for t in states(cache_a)]
    graph.step(nxt_b, cache_b)
    # cache_a let go of the buffers with its own state, which cache_b's step did not touch
    assert all(torch.equal(a, b) for a, b in zip(states(cache_a), after_one))
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(states(cache_a), states(cache_b)))
    # and decoding cache_a again (re-adopted) continues from that state
    eager = copy.deepcopy(cache_a)
    with torch.no_grad():
        ref = model(input_ids=nxt_a, past_key_values=eager, use_cache=True).logits
    assert torch.equal(graph.step(nxt_a, cache_a), ref)


def test_decode_graph_errors():
    model = make_model().eval()
    nxt, cache = prefill(model, tokens(B=2, T=5))
    with pytest.raises(ValueError, match='eval mode'):
        MesaDecodeGraph(model.train(), cache, capture=False)
    model.eval()
    with pytest.raises(ValueError, match='after a prefill'):
        MesaDecodeGraph(model, None, capture=False)
    with pytest.raises(ValueError, match='CUDA device'):
        MesaDecodeGraph(model, cache, capture=True)
    graph = MesaDecodeGraph(model, cache, capture=False)
    with pytest.raises(ValueError, match=r'shape \(2, 1\)'):
        graph.step(torch.zeros(3, 1, dtype=torch.long), cache)
    _, other = prefill(model, tokens(B=3, T=5))
    with pytest.raises(ValueError, match='another batch size'):
        graph.step(nxt, other)
    # (the check reads the config: a hybrid model itself needs flash-attn)
    model.config.attn = {'layers': [1], 'num_heads': 2}
    with pytest.raises(ValueError, match='without attention layers'):
        MesaDecodeGraph(model, cache, capture=False)


def test_generate_drops_mask_after_prefill():
    # without attention layers a decode step needs no mask (every new token is generate()'s own); the prefill does
    model = make_model().eval()
    ids = tokens(B=2, T=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    _, cache = prefill(model, ids)
    first = model.prepare_inputs_for_generation(ids, cache=None, attention_mask=mask, is_first_iteration=True)
    later = model.prepare_inputs_for_generation(ids, cache=cache, attention_mask=mask, is_first_iteration=False)
    assert first['attention_mask'] is mask
    assert later['attention_mask'] is None
    # with attention layers the mask stays (the config is what is read: a hybrid model itself needs flash-attn)
    model.config.attn = {'layers': [1], 'num_heads': 2}
    kept = model.prepare_inputs_for_generation(ids, cache=cache, attention_mask=mask, is_first_iteration=False)
    assert kept['attention_mask'] is mask


def greedy(new_tokens):
    """generate() keywords: `new_tokens` greedy tokens exactly, with their logits."""
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True)


def assert_same_generation(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_generate_with_decode_graph_option_on_cpu():
    # off CUDA the option runs the same static step eagerly: generate() through it, token for token and logit for
    # logit the eager generate()
    model = make_model().eval()
    prompt = tokens(B=2, T=7)
    with torch.no_grad():
        eager = model.generate(prompt, **greedy(5))
        model.config.decode_cuda_graph = True
        static = model.generate(prompt, **greedy(5))
    assert model._decode_graphs[2].graph is None and model._decode_graphs[2]._owner is not None
    assert_same_generation(static, eager)


def test_decode_graph_follows_replaced_parameters():
    # a step built on the float32 model must not serve it once its parameters are float64 tensors: its float32
    # state buffers would round every state (on a GPU the graph would read the freed float32 storage)
    model = make_model().eval()
    prompt = tokens(B=2, T=7)
    with torch.no_grad():
        model.config.decode_cuda_graph = True
        model.generate(prompt, **greedy(4))
        first = model._decode_graphs[2]
        model.double()
        static = model.generate(prompt, **greedy(4))
        assert model._decode_graphs[2] is not first
        assert model._decode_graphs[2].buffers[0][0].dtype == torch.float64
        model.config.decode_cuda_graph = False
        eager = model.generate(prompt, **greedy(4))
    assert_same_generation(static, eager)


def test_decode_graph_checks_the_parameters_once_a_generation(monkeypatch):
    # the check walks every parameter: at a generation's first decode step, not at every token
    from fla_mesa.models.mesa_net import decode_graph
    calls = []
    key = decode_graph.parameters_key
    monkeypatch.setattr(decode_graph, 'parameters_key', lambda model: calls.append(1) or key(model))
    model = make_model().eval()
    model.config.decode_cuda_graph = True
    with torch.no_grad():
        model.generate(tokens(B=2, T=7), **greedy(6))
        assert len(calls) == 1  # the capture's
        model.generate(tokens(B=2, T=7), **greedy(6))
    assert len(calls) == 2


@pytest.mark.skipif(not ON_GPU, reason='CUDA graphs need a GPU')
def test_generate_with_decode_graph_equals_eager():
    model = make_model().cuda().eval()
    prompt = tokens(B=2, T=40).cuda()
    kwargs = greedy(12)
    with torch.no_grad():
        eager = model.generate(prompt, **kwargs)
        model.config.decode_cuda_graph = True
        graphed = model.generate(prompt, **kwargs)
        # the graph was captured and replayed (not an eager fallback)
        assert 2 in model._decode_graphs and model._decode_graphs[2].graph is not None
        again = model.generate(prompt, **kwargs)
    assert torch.equal(graphed.sequences, eager.sequences)
    for a, b, c in zip(graphed.logits, eager.logits, again.logits):
        # same kernels and configs: equal up to float32 reordering
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, c)
