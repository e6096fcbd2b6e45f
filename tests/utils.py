# Copyright (c) 2026, fla-mesa contributors. MIT license.

import os

import pytest
import torch
import torch.nn.functional as F

# the kernels run on a GPU (not in the Triton interpreter): the tests that move their inputs there
ON_GPU = torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET', '0') != '1'


# the floor of `fp32_bound`: about the error of the float32 exact reference on these small, well-conditioned
# problems (a few float32 ulps), for results where that reference happens to be nearly exact (a state it only sums)
FP32_FLOOR = 3e-7


def fp32_bound(base: float, gpu: bool = False) -> float:
    """
    FlashAttention's rule: at most 2x the error of the float32 reference `base` (floor `FP32_FLOOR`); on a GPU 3x
    that, for the kernels' split (tf32x3, bf16x3) products.
    """
    return max(2 * base, FP32_FLOOR) * (3 if gpu else 1)


def bf16_floor(ref: torch.Tensor, truncated: bool = False) -> float:
    """
    The error of rounding the float64 result `ref` itself to bf16: what a bf16 output cannot beat. `truncated`: the
    error of truncating instead (about twice as large), for outputs a kernel stores in bf16 under Triton's
    interpreter, which casts float32 to bf16 by truncation (a GPU rounds to nearest).
    """
    ref = ref.detach().double().cpu()
    if truncated:
        return rel_err((ref.float().view(torch.int32) & -65536).view(torch.float32), ref)
    return rel_err(ref.bfloat16(), ref)


# float32 results of the Triton kernels from 16-bit inputs: their 'auto' products are bf16x3, which keep 16 of a
# float32 operand's 24 mantissa bits (the 2^-17 relative rest of it dropped, per product): 2x that
BF16X3_BOUND = 2 ** -16


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 on the CPU (kernel outputs on a GPU, references on the CPU); NaN gives inf."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float('inf')
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_rel(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float):
    err = rel_err(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def to_device(x, device):
    """Tensors (also inside tuples, lists and dicts) moved to `device`; `.to` is differentiable, gradients flow back."""
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(y, device) for y in x)
    if isinstance(x, dict):
        return {k: to_device(y, device) for k, y in x.items()}
    return x


def on_cuda(fn):
    """`fn` run on the GPU for CPU tensors: arguments moved there, results back (tests compare on the CPU)."""
    def wrapped(*args, **kwargs):
        return to_device(fn(*to_device(args, 'cuda'), **to_device(kwargs, 'cuda')), 'cpu')
    return wrapped


def on_triton(fn):
    """
    `fn` where its Triton kernels run: as it is under TRITON_INTERPRET=1, on the GPU (`on_cuda`) where there is one,
    else `None` (the test module then skips: `pytestmark = NEEDS_TRITON`).
    """
    if os.environ.get('TRITON_INTERPRET') == '1':
        return fn
    return on_cuda(fn) if torch.cuda.is_available() else None


NEEDS_TRITON = pytest.mark.skipif(
    os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
    reason="the Triton kernels need TRITON_INTERPRET=1 or a GPU",
)


def make_inputs(B, T, H, K, V, dtype=torch.float64, gate=(3.0, 1.0), initial_state=False, seed=42, device='cpu'):
    """Mesa inputs like the layer makes: unit-norm q and k, g = logsigmoid(N(mu, sigma)), beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    q = F.normalize(randn(B, T, H, K), dim=-1)
    k = F.normalize(randn(B, T, H, K), dim=-1)
    v = randn(B, T, H, V)
    g = F.logsigmoid(randn(B, T, H) * gate[1] + gate[0])
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    lamb = 0.25 + torch.rand(H, K, generator=gen, dtype=torch.float64)
    out = [x.to(dtype).to(device) for x in (q, k, v, g, beta)] + [lamb.to(dtype).to(device)]
    if initial_state:
        a = randn(B, H, K, K)
        h_kk = a @ a.transpose(-1, -2) / K
        h_kv = randn(B, H, K, V)
        sdtype = torch.float64 if dtype == torch.float64 else torch.float32
        out.append((h_kk.to(sdtype).to(device), h_kv.to(sdtype).to(device)))
    else:
        out.append(None)
    return out


def run_with_grads(fn, inputs, do, dht=None, **kwargs):
    """Runs `fn(q, k, v, g, beta, lamb, initial_state, ...)`, backpropagates `do` (and `dht`), returns outputs and grads."""
    q, k, v, g, beta, lamb, h0 = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, lamb)]
    h0 = None if h0 is None else tuple(h.detach().clone().requires_grad_() for h in h0)
    o, ht = fn(*leaves, h0, output_final_state=True, **kwargs)[:2]
    loss = (o * do.to(o.dtype)).sum()
    if dht is not None:
        loss = loss + sum((h * dh.to(h.dtype)).sum() for h, dh in zip(ht, dht))
    loss.backward()
    grads = dict(zip(['dq', 'dk', 'dv', 'dg', 'dbeta', 'dlamb'], [t.grad for t in leaves]))
    if h0 is not None:
        grads['dh0_kk'], grads['dh0_kv'] = h0[0].grad, h0[1].grad
    return o.detach(), tuple(h.detach() for h in ht), grads


def naive_gla(q, k, v, g, beta, lamb, initial_state=None, output_final_state=True, **kwargs):
    """
    The op without its solve (`cg_max_steps=0`: q* = q), token by token in the inputs' dtype, differentiable by
    autograd: `o_t = S_tᵀ q_t`, the states as `naive_exact_mesa`'s. Λ is unused (its gradient is zero); CG arguments
    are ignored.
    """
    B, T, H, K = q.shape
    if initial_state is None:
        h_kk = q.new_zeros(B, H, K, K)
        h_kv = q.new_zeros(B, H, K, v.shape[-1])
    else:
        h_kk, h_kv = (h.to(q.dtype) for h in initial_state)
    o = []
    for t in range(T):
        gamma = g[:, t].exp()[..., None, None]
        kb = k[:, t] * beta[:, t, :, None]
        h_kk = gamma * h_kk + kb[..., :, None] * k[:, t, :, None, :]
        h_kv = gamma * h_kv + kb[..., :, None] * v[:, t, :, None, :]
        o.append(torch.einsum('bhk,bhkv->bhv', q[:, t], h_kv))
    o = torch.stack(o, 1) + 0 * lamb.sum()
    return o, ((h_kk, h_kv) if output_final_state else None)


def poison_empty(monkeypatch):
    """
    Every floating buffer made with `Tensor.new_empty` or `torch.empty_like` starts as NaN, so that an output a kernel
    leaves unwritten shows in what the test compares.
    """
    new_empty, empty_like = torch.Tensor.new_empty, torch.empty_like

    def poisoned(out):
        return out.fill_(float('nan')) if out.is_floating_point() else out
    monkeypatch.setattr(torch.Tensor, 'new_empty', lambda self, *size, **kw: poisoned(new_empty(self, *size, **kw)))
    monkeypatch.setattr(torch, 'empty_like', lambda *args, **kw: poisoned(empty_like(*args, **kw)))


def torch_chunk_path(monkeypatch):
    """
    `chunk_mesa` on its PyTorch path whatever its inputs (the op picks its path by them: Triton for CUDA tensors and
    under the interpreter), so that one process tests both paths.
    """
    from fla_mesa.ops.mesa import chunk as chunk_module
    monkeypatch.setattr(chunk_module, '_use_triton_path', lambda *args, **kwargs: False)


def on_torch_paths(monkeypatch, fn):
    """`fn()` on the PyTorch paths (the float32 baseline of FlashAttention's rule for the Triton paths)."""
    with monkeypatch.context() as m:
        m.setenv('TRITON_INTERPRET', '0')
        torch_chunk_path(m)
        return fn()
