# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""MesaForCausalLM on CPU (PyTorch paths): varlen, padding, cached generation, init on meta, training, registration."""

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fla_mesa.layers import MesaNet
from fla_mesa.models import MesaBlock, MesaConfig, MesaForCausalLM, MesaModel
from tests.utils import ON_GPU, assert_rel, fp32_bound, rel_err

device = 'cpu'
VOCAB = 64


@pytest.fixture(autouse=True)
def torch_paths(monkeypatch):
    # PyTorch paths on CPU tensors even when the suite runs under TRITON_INTERPRET=1 (the layer tests cover both)
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    warnings.filterwarnings('ignore', message='.*attention mask.*')


def make_config(**kwargs):
    args = dict(
        hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=VOCAB, hidden_ratio=2,
        fuse_cross_entropy=False, cg_tol_inference=None, cg_tol_training=None,
    )
    args.update(kwargs)
    return MesaConfig(**args)


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(**kwargs)).to(device)
    # larger weights than the 0.02 init so that every layer changes the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


def tokens(B=2, T=20, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


def test_registration():
    assert isinstance(AutoConfig.for_model('mesa'), MesaConfig)
    config = make_config()
    assert type(AutoModel.from_config(config)) is MesaModel
    assert type(AutoModelForCausalLM.from_config(config)) is MesaForCausalLM
    # fla's own MesaNet keeps its model type
    import fla  # noqa: F401
    assert type(AutoConfig.for_model('mesa_net')).__name__ == 'MesaNetConfig'


@pytest.mark.parametrize('fuse_norm', [True, False])
def test_dense_equals_varlen(fuse_norm):
    # here and below, two float32 runs of the model: 3e-6, about 3x the largest such difference of the logits
    model = make_model(fuse_norm=fuse_norm)
    x = tokens(B=3, T=20)
    dense = model(input_ids=x).logits
    cu_seqlens = torch.tensor([0, 20, 40, 60], dtype=torch.int32, device=device)
    var = model(input_ids=x.view(1, 60), cu_seqlens=cu_seqlens).logits
    assert_rel('logits', var.view_as(dense), dense, 3e-6)


def test_padding_mask_equals_per_sample():
    model = make_model().eval()
    lens = [16, 9, 4]
    x = tokens(B=3, T=16)
    mask = torch.zeros(3, 16, dtype=torch.long, device=device)
    for i, n in enumerate(lens):
        mask[i, 16 - n:] = 1
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask).logits
        for i, n in enumerate(lens):
            ref = model(input_ids=x[i:i + 1, 16 - n:]).logits[0]
            assert_rel(f'sample {i}', logits[i, 16 - n:], ref, 3e-6)


@pytest.mark.parametrize('pieces', [[5] + [1] * 11, [5, 4, 3, 4], [12, 4]], ids=['one-by-one', 'chunks', 'two-prompts'])
@pytest.mark.parametrize('padded', [False, True])
def test_cached_forward_equals_full(pieces, padded):
    model = make_model().eval()
    x = tokens(B=2, T=16)
    mask = torch.ones(2, 16, dtype=torch.long, device=device)
    if padded:
        mask[1, :3] = 0
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=mask if padded else None).logits
        past, outs, t = None, [], 0
        for n in pieces:
            out = model(
                input_ids=x[:, t:t + n],
                attention_mask=mask[:, :t + n] if padded else None,
                past_key_values=past,
                use_cache=True,
            )
            past, t = out.past_key_values, t + n
            outs.append(out.logits)
    m = mask.bool()
    assert_rel('logits', torch.cat(outs, 1)[m], full[m], 3e-6)


def test_generate_equals_greedy_without_cache():
    model = make_model().eval()
    prompt = tokens(B=2, T=6)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             use_cache=True, pad_token_id=0)
        seq = prompt
        for _ in range(8):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_cache_keyword():
    # transformers >= 5.24 generates with `cache=` (its new name for `past_key_values`): the same state either way
    model = make_model().eval()
    x = tokens(B=2, T=7)
    with torch.no_grad():
        past = model(input_ids=x[:, :6], use_cache=True).past_key_values
        a = model(input_ids=x[:, 6:], past_key_values=past, use_cache=True).logits
        past = model(input_ids=x[:, :6], use_cache=True).past_key_values
        b = model(input_ids=x[:, 6:], cache=past, use_cache=True).logits
        full = model(input_ids=x, use_cache=False).logits[:, 6:]
        assert torch.equal(a, b)
        assert_rel('logits', b, full, 3e-6)
        with pytest.raises(TypeError, match='not both'):
            model(input_ids=x[:, 6:], cache=past, past_key_values=past)


@pytest.mark.parametrize('kwargs', [dict(), dict(use_output_gate=True, expand_v=2, use_v_conv=True), dict(fuse_norm=False)],
                         ids=['default', 'gate-expand', 'unfused-norm'])
def test_backward_all_parameters(kwargs):
    model = make_model(**kwargs).train()
    x = tokens()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_same_grads():
    x = tokens()
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=x, labels=x).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert_rel('grad', b, a, 1e-5)


def test_meta_device_init():
    # flame: build on meta, materialise with to_empty, then post_init must set every parameter
    config = make_config(lambda_initial_value=1.5)
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(config)
    for module in model.modules():
        module._is_hf_initialized = False
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float('nan'))
    model.post_init()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for layer in model.model.layers:
        attn = layer.attn
        torch.testing.assert_close(attn.get_lambda(), torch.full((2, 16), 1.5))
        gamma = torch.sigmoid(attn.a_proj.bias)
        assert ((gamma > 0.89) & (gamma < 0.9991)).all()
        assert (attn.b_proj.bias == 0).all()
        assert (attn.o_norm.weight == 1).all()
        assert 0.01 < attn.q_proj.weight.std() < 0.03
    # and it trains
    x = tokens()
    model(input_ids=x, labels=x).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_falls():
    # a fixed periodic sequence: next-token loss must fall well below its start in a few dozen steps
    model = make_model(seed=0, num_hidden_layers=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    period = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(3))
    x = period.repeat(4, 4).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_save_and_load(tmp_path):
    model = make_model(use_solver=False, cg_max_steps_inference=7).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MesaForCausalLM and loaded.config.model_type == 'mesa'
    assert loaded.model.layers[0].attn.use_solver is False
    assert loaded.model.layers[0].attn.cg_max_steps_inference == 7
    x = tokens()
    with torch.no_grad():
        assert_rel('logits', loaded(input_ids=x).logits, model(input_ids=x).logits, 1e-6)


def test_hybrid_attention_layers():
    config = make_config(num_hidden_layers=3, attn={'layers': [1], 'num_heads': 2})
    assert config.attn['layers'] == [1]
    # fla's Attention layer needs flash-attn
    pytest.importorskip('flash_attn')
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model.model.layers[0].attn, MesaNet)
    assert not isinstance(model.model.layers[1].attn, MesaNet)
    assert isinstance(model.model.layers[2], MesaBlock)


def test_config_and_layer_errors():
    with pytest.raises(ValueError, match='cg_max_steps_training'):
        AutoModelForCausalLM.from_config(make_config(cg_max_steps_training=-1))
    with pytest.raises(ValueError, match='gamma_cap'):
        AutoModelForCausalLM.from_config(make_config(gamma_cap=0.0))
    # fla's config names are accepted
    assert make_config(max_cg_step_training=5).cg_max_steps_training == 5


@pytest.mark.skipif(not ON_GPU, reason='the model with its GPU kernels')
def test_on_gpu():
    import copy
    model = make_model().eval()
    x = tokens(B=2, T=70)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(input_ids=x).logits
        cpu = model(input_ids=x).logits
        model.cuda()
        gpu = model(input_ids=x.cuda()).logits
        # the rule of the layer test: 2x the CPU's float32 error (floor 2e-6), times 3 for the kernels' split products
        err, base = rel_err(gpu.cpu(), ref), rel_err(cpu, ref)
        assert err <= fp32_bound(base, gpu=True), f"logits: GPU {err:.2e}, CPU {base:.2e}"
        # cached decoding (the recurrent kernel) continues the chunk kernel's prefill: 3x the CPU test's bound
        past = model(input_ids=x[:, :64].cuda(), use_cache=True).past_key_values
        outs = []
        for t in range(64, 70):
            out = model(input_ids=x[:, t:t + 1].cuda(), past_key_values=past, use_cache=True)
            past = out.past_key_values
            outs.append(out.logits)
        assert_rel('cached logits', torch.cat(outs, 1), gpu[:, 64:], 3e-5)
    # a bf16 training step: finite loss, every parameter gets a finite, nonzero gradient
    model = model.to(torch.bfloat16).train()
    loss = model(input_ids=x.cuda(), labels=x.cuda()).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
