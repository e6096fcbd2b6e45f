# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
MesaForCausalLM on its Triton path under TRITON_INTERPRET=1 against the same model in float64 on its PyTorch paths:
cached `generate()` with a left-padded batch and every parameter's gradient; and a hybrid with an attention layer
whose flash-attn calls are stood in for by torch's sdpa where flash-attn is absent (against the Mesa op's PyTorch
path). Bounds: twice FlashAttention's rule (as in tests/layers/test_layer_triton.py) against the float32 model on its
PyTorch paths. Tiny sizes: the interpreter is slow.
"""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fla_mesa.layers import MesaNet
from tests.models.test_modeling_mesa import make_config, make_model, tokens
from tests.utils import FP32_FLOOR, fp32_bound, on_torch_paths, rel_err, torch_chunk_path

pytestmark = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET', '0') != '1',
                                reason='the Triton path on the CPU: needs TRITON_INTERPRET=1 at start-up')


@pytest.fixture(autouse=True)
def triton_paths(monkeypatch):
    warnings.filterwarnings('ignore', message='.*attention mask.*')


# tests/interpret.py called first thing in a fresh process: it must cover the fla modules imported after it (the
# model's first fla kernel, its fused RMSNorm, runs before any Mesa kernel)
_FIRST_CALL = """
from tests.interpret import interpret_compat
interpret_compat()
import torch
from tests.models.test_modeling_mesa import make_model, tokens
model = make_model()
model(input_ids=tokens(B=1, T=4))
"""


def test_model_first_call_in_fresh_process():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=os.pathsep.join([root, os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, '-c', _FIRST_CALL], capture_output=True, text=True, env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]


def check(name, x, base, ref, model_floor=0.0):
    err, floor = rel_err(x, ref), rel_err(base, ref)
    # the rule's premise: the baseline itself near the float32 floor (see tests/layers/test_layer_triton.py)
    assert floor <= 4 * FP32_FLOOR, f"{name}: PyTorch path {floor:.2e} off float64"
    # twice the op's rule (see tests/layers/test_layer_triton.py), from the larger of this tensor's floor and
    # `model_floor`
    bound = 2 * fp32_bound(max(floor, model_floor))
    assert err <= bound, f"{name}: Triton path {err:.2e}, PyTorch path {floor:.2e} (model {model_floor:.2e})"


def test_generate_left_padded_matches_float64(monkeypatch):
    # the prompt's prefill and every decoded token run the recurrent kernel from the cache; each sample's logits
    # against the float64 model run on that sample alone, unpadded and without a cache
    model = make_model().eval()
    prompt = tokens(B=2, T=6)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=True,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        logits = torch.stack(out.logits, 1)
        model64 = copy.deepcopy(model).double()
        for i in range(2):
            seq = out.sequences[i:i + 1, int((mask[i] == 0).sum()):]
            ref = on_torch_paths(monkeypatch, lambda: model64(input_ids=seq).logits[0, -5:-1])
            base = on_torch_paths(monkeypatch, lambda: model(input_ids=seq).logits[0, -5:-1])
            check(f'sample {i}', logits[i], base, ref)


def test_backward_matches_float64(monkeypatch):
    model = make_model(use_output_gate=True, num_hidden_layers=1).train()
    x = tokens(B=2, T=8)

    def grads(m):
        loss = m(input_ids=x, labels=x).loss
        return [loss] + list(torch.autograd.grad(loss, list(m.parameters())))

    ref = on_torch_paths(monkeypatch, lambda: grads(copy.deepcopy(model).double()))
    base = on_torch_paths(monkeypatch, lambda: grads(model))
    out = grads(model)
    # the float32 model's error over all its gradients together: a small gradient's own float32 error can be far
    # below it by luck of rounding (a_proj.bias: 4e-8 on one CPU, where every gradient carries about 1e-6), and
    # rounding that differs by CPU must not decide the test
    model_floor = rel_err(torch.cat([b.flatten() for b in base[1:]]), torch.cat([r.flatten() for r in ref[1:]]))
    for name, a, b, r in zip(['loss'] + [n for n, _ in model.named_parameters()], out, base, ref):
        check(name, a, b, r, model_floor)


def sdpa_attn(q, k, v, causal=True, window_size=(-1, -1), **kwargs):
    """flash_attn_func on torch's sdpa: [B, T, H, D]; causal aligns the last query with the last key, as flash-attn."""
    assert causal and tuple(window_size) == (-1, -1)
    Tq, Tk = q.shape[1], k.shape[1]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def sdpa_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                     window_size=(-1, -1), **kwargs):
    """flash_attn_varlen_func on `sdpa_attn`, one sequence at a time: [total, H, D]."""
    bounds = zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist())
    return torch.cat([sdpa_attn(q[None, a:b], k[None, c:d], v[None, c:d], causal, window_size)[0]
                      for a, b, c, d in bounds], 0)


def test_hybrid_with_sdpa_attention(monkeypatch):
    import fla.layers.attn as fla_attn
    if fla_attn.flash_attn_func is None:
        monkeypatch.setattr(fla_attn, 'flash_attn_func', sdpa_attn)
        monkeypatch.setattr(fla_attn, 'flash_attn_varlen_func', sdpa_attn_varlen, raising=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(num_hidden_layers=2, attn={'layers': [1], 'num_heads': 2}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.eval()
    assert isinstance(model.model.layers[0].attn, MesaNet) and isinstance(model.model.layers[1].attn, fla_attn.Attention)
    x = tokens(B=2, T=8)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=mask).logits
        # cached: a prompt of 6 tokens, then one at a time
        past, outs = None, []
        for a, b in ((0, 6), (6, 7), (7, 8)):
            out = model(input_ids=x[:, a:b], attention_mask=mask[:, :b], past_key_values=past, use_cache=True)
            past = out.past_key_values
            outs.append(out.logits)
        # fla's rotary embedding has neither a PyTorch nor a float64 path under the interpreter: the reference is the
        # same float32 model with the Mesa op on its PyTorch path (float64-checked above and in test_chunk.py)
        torch_chunk_path(monkeypatch)
        ref = model(input_ids=x, attention_mask=mask).logits
    m = mask.bool()
    # float32 against float32: each path within 2x the float32 floor of the truth, so at most 4x apart
    for name, logits in (('logits', full), ('cached logits', torch.cat(outs, 1))):
        assert rel_err(logits[m], ref[m]) <= 4 * FP32_FLOOR, f"{name}: {rel_err(logits[m], ref[m]):.2e}"
    # and it trains: every parameter gets a finite, nonzero gradient
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
