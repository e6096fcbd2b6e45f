# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
`short_conv_l2norm` (the layer's q and k in training: `l2norm(silu(conv(x)))` per head, two kernels of its own):
the forward equal to fla's `ShortConvolution` then fla's `l2norm` (under the interpreter to the bit), and the
gradients of x, the conv's weight and its bias against float64, within FlashAttention's rule of the error of fla's
modules themselves; dense with odd lengths and x a column view of a wider tensor, a head size that is not a power
of two with a 3-wide conv, varlen, bias or none, upstream gradients at scale 1 and 1e-8.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from fla.modules import ShortConvolution
from fla.modules.l2norm import l2norm

from fla_mesa.ops.mesa.conv_l2norm import short_conv_l2norm
from fla_mesa.ops.mesa.utils import L2NORM_EPS
from tests.utils import NEEDS_TRITON, ON_GPU, fp32_bound, rel_err

pytestmark = NEEDS_TRITON
INTERPRETING = os.environ.get('TRITON_INTERPRET', '0') == '1'
device = 'cuda' if ON_GPU else 'cpu'
W = 4


def make_conv(D, bias, dtype, seed=0, W=W):
    torch.manual_seed(seed)
    conv = ShortConvolution(D, W, bias=bias, activation='silu', backend='triton')
    with torch.no_grad():
        conv.weight.normal_(0, 0.5)
        if bias:
            conv.bias.normal_(0, 0.5)
    return conv.to(device, dtype)


def reference(x, weight, bias, head_dim, cu_seqlens):
    """l2norm(silu(conv(x))) per head, in float64, each sequence on its own."""
    W = weight.shape[1]
    bounds = [0, x.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        z = F.conv1d(F.pad(x[:, s:e].transpose(1, 2), (W - 1, 0)), weight[:, None], bias, groups=x.shape[-1])
        y = F.silu(z.transpose(1, 2)).unflatten(-1, (-1, head_dim))
        out.append(y / (y.square().sum(-1, keepdim=True) + L2NORM_EPS).sqrt())
    return torch.cat(out, 1)


def fla_path(conv, x, head_dim, cu_seqlens):
    return l2norm(conv(x, cu_seqlens=cu_seqlens)[0].unflatten(-1, (-1, head_dim)), eps=L2NORM_EPS)


def ours(conv, x, head_dim, cu_seqlens):
    return short_conv_l2norm(conv, x, head_dim, cu_seqlens)


def outputs_and_grads(fn, conv, base, cols, head_dim, cu_seqlens, dy):
    # x a column view of `base` (as the layer's fused projections give it); gradients of base's columns, of the
    # weight and of the bias
    base = base.detach().clone().requires_grad_()
    y = fn(conv, base[..., cols], head_dim, cu_seqlens)
    leaves = [base, conv.weight] + ([conv.bias] if conv.bias is not None else [])
    grads = torch.autograd.grad((y.float() * dy).sum(), leaves)
    return [y, grads[0][..., cols], *grads[1:]]


CASES = {
    # B, T, heads, head_dim, cu_seqlens, the conv's width; T = 37: more than one 32-token block and a masked tail
    'dense': (2, 37, 3, 32, None, 4),
    'dense-hd24-w3': (1, 37, 2, 24, None, 3),
    'varlen': (1, 45, 2, 32, [0, 7, 8, 40, 45], 4),
}


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('dtype, scale, bias', [(torch.float32, 1.0, True), (torch.bfloat16, 1.0, False),
                                                (torch.bfloat16, 1e-8, True)])
def test_conv_l2norm_matches_fla_and_float64(case, dtype, scale, bias):
    B, T, H, HD, cu, width = CASES[case]
    D = H * HD
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    conv = make_conv(D, bias, dtype, W=width)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(B, T, D + 9, generator=gen).to(device, dtype)
    cols = slice(5, 5 + D)
    dy = (torch.randn(B, T, H, HD, generator=gen) * scale).to(device)

    got = outputs_and_grads(ours, conv, base, cols, HD, cu_seqlens, dy)
    fla = outputs_and_grads(fla_path, conv, base, cols, HD, cu_seqlens, dy)
    conv64 = make_conv(D, bias, torch.float64, W=width).cpu()
    with torch.no_grad():
        conv64.weight.copy_(conv.weight.cpu())
        if bias:
            conv64.bias.copy_(conv.bias.cpu())
    cu64 = None if cu_seqlens is None else cu_seqlens.cpu()
    ref = outputs_and_grads(lambda c, x, hd, cs: reference(x, c.weight.squeeze(1), c.bias, hd, cs),
                            conv64, base.cpu().double(), cols, HD, cu64, dy.cpu().double())

    assert got[0].dtype == dtype and got[0].shape == (B, T, H, HD)
    if INTERPRETING:
        # the same operations in the same order as fla's conv and norm
        assert torch.equal(got[0], fla[0])
    names = ['y', 'dx', 'dw', 'db'][:len(got)]
    for name, x, f, r in zip(names, got, fla, ref):
        bound = fp32_bound(rel_err(f, r), gpu=ON_GPU)
        err = rel_err(x, r)
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e} (fla's modules: {rel_err(f, r):.3e})"


def test_conv_l2norm_keeps_only_its_input():
    # x, a view of the projections' output, is what the backward recomputes from; nothing else but the parameters
    conv = make_conv(64, False, torch.bfloat16)
    base = torch.randn(2, 40, 70, device=device, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        short_conv_l2norm(conv, base[..., 3:67], 32)
    kept = [t for t in saved if t.untyped_storage().data_ptr() != conv.weight.untyped_storage().data_ptr()]
    assert len(kept) == 1 and kept[0].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def test_conv_l2norm_bad_head_dim():
    conv = make_conv(64, False, torch.float32)
    with pytest.raises(ValueError, match=r'\(64\).*`head_dim` \(24\)'):
        short_conv_l2norm(conv, torch.randn(1, 8, 64, device=device), 24)


# both kernels compiled for sm_90 on any machine (tests/sm90.py: Triton's own ptxas, no GPU), as the layer runs them
# (bf16, heads of 128, a bias)
_SM90_SCRIPT = """
from tests.sm90 import compile_sm90
from fla_mesa.ops.mesa import conv_l2norm as m
common = dict(x='*bf16', weight='*bf16', bias='*bf16', cu_seqlens='*i32', chunk_indices='*i32', T='i32',
              stride_x_n='i64', stride_x_t='i64')
consts = dict(HD=128, W=4, BT=m.BT, BD=128, EPS=1e-6, ROUND=True, HAS_BIAS=True, IS_VARLEN=False)
kernels = [compile_sm90(m.conv_l2norm_fwd_kernel, dict(common, y='*bf16'), consts, num_warps=4, num_stages=1),
           compile_sm90(m.conv_l2norm_bwd_kernel, dict(common, dy='*bf16', dz='*bf16'), consts, num_warps=4,
                        num_stages=1)]
print(' '.join(str(len(k.asm['cubin'])) for k in kernels))
"""


def test_conv_l2norm_kernels_compile_for_sm90():
    from tests.sm90 import run_apart
    out = run_apart(_SM90_SCRIPT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(int(n) > 0 for n in out.stdout.split()) and len(out.stdout.split()) == 2
