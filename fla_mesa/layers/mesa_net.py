# Copyright (c) 2026, fla-mesa contributors. MIT license.

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache
from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution

from fla_mesa.modules import fused_linears
from fla_mesa.ops.mesa import chunk_mesa, fused_recurrent_mesa
from fla_mesa.ops.mesa.chunk import qk_l2norm
from fla_mesa.ops.mesa.conv_l2norm import short_conv_l2norm
from fla_mesa.ops.mesa.gate import fused_mesa_gate, naive_mesa_gate
from fla_mesa.ops.mesa.precond import DEFAULT_PRECONDITION, is_precondition
from fla_mesa.ops.mesa.utils import pack_cg_steps, split_cg_steps, use_triton

if TYPE_CHECKING:
    from fla.models.utils import Cache
    from transformers.processing_utils import Unpack

# γ of the write gate at initialisation is drawn so that 1 - γ is log-uniform in this range: memories that last
# from ten to a thousand tokens (a zero bias would start every head at γ = 0.5, forgetting within a few tokens)
GATE_INIT_DECAY_RANGE = (1e-3, 1e-1)


def short_conv_torch(
    conv: ShortConvolution,
    x: torch.Tensor,
    cache: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    `ShortConvolution.forward` in PyTorch with the module's own weights, for CPUs without Triton.
    Same cache layout as fla: `[N, D, W]`, the last `W` inputs, the newest at `W - 1`.
    """
    D, W = conv.hidden_size, conv.kernel_size[0]
    if cu_seqlens is None:
        seqs = list(x)
    else:
        seqs = [x[0, bos:eos] for bos, eos in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())]
    ys, states = [], []
    for i, s in enumerate(seqs):
        prev = x.new_zeros(W, D) if cache is None else cache[i].transpose(0, 1).to(x.dtype)
        # [W + T, D]: the cached inputs, then the new ones; the conv sees the last W - 1 cached ones
        xs = torch.cat([prev, s], 0)
        bias = None if conv.bias is None else conv.bias.to(x.dtype)
        y = F.conv1d(xs[1:].transpose(0, 1).unsqueeze(0), conv.weight.to(x.dtype), bias, groups=D)
        y = y.squeeze(0).transpose(0, 1)
        if conv.activation in ('silu', 'swish'):
            y = F.silu(y)
        ys.append(y)
        states.append(xs[-W:].transpose(0, 1))
    y = torch.stack(ys, 0) if cu_seqlens is None else torch.cat(ys, 0).unsqueeze(0)
    return y, (torch.stack(states, 0).contiguous() if output_final_state else None)


def rms_norm_torch(norm: RMSNorm | FusedRMSNormGated, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """fla's `RMSNorm` / `FusedRMSNormGated` (norm, weight, then the gate's activation) in PyTorch, in float32."""
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight.float()
    if getattr(norm, 'bias', None) is not None:
        y = y + norm.bias.float()
    if g is not None:
        y = y * (torch.sigmoid(g.float()) if norm.activation == 'sigmoid' else F.silu(g.float()))
    return y.to(x.dtype)


def _check(name: str, value, ok: bool, expected: str):
    if not ok:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}")


class MesaNet(nn.Module):
    r"""
    The Mesa layer of [MesaNet: Sequence Modeling by Locally Optimal Test-Time Training](https://arxiv.org/abs/2506.05233),
    a drop-in token mixer for fla models. Per head, with `γ_t = σ(a_t)` (capped, see `use_gamma_cap`) and `β_t = σ(b_t)`:

        H_t = γ_t H_{t-1} + β_t k_t k_tᵀ,   S_t = γ_t S_{t-1} + β_t k_t v_tᵀ,   o_t = S_tᵀ (H_t + Λ)⁻¹ q_t

    with `q`, `k` L2-normalised and `Λ = lambda_lower_bound + softplus(λ)` learnt per head and key dimension.
    The solve is done by conjugate gradient (`fla_mesa.ops.mesa`).

    Args:
        hidden_size (int, Optional):
            The hidden size of the input. Default: 2048.
        num_heads (int, Optional):
            The number of heads. Default: 16.
        head_dim (int, Optional):
            The key (and query) dimension of each head. Default: 128.
        expand_v (float, Optional):
            The value dimension of each head is `head_dim * expand_v`. Default: 1.
        mode (str, Optional):
            The kernel for long inputs outside training: `chunk` or `fused_recurrent`. Training and inputs with
            gradients always use `chunk`; inference inputs of at most 64 tokens use `fused_recurrent`. Default: `chunk`.
        use_output_gate (bool, Optional):
            Whether to gate the output: `FusedRMSNormGated` instead of `RMSNorm`. Default: `False`.
        use_short_conv (bool, Optional):
            Whether to apply short causal convolutions (with SiLU) to q and k; without them q and k get a SiLU only.
            Default: `True`.
        use_v_conv (bool, Optional):
            Whether to apply a short convolution to v as well (only with `use_short_conv`). Default: `False`.
        conv_size (int, Optional):
            The kernel size of the short convolutions. Default: 4.
        conv_bias (bool, Optional):
            Whether the short convolutions have a bias. Default: `False`.
        layer_idx (int, Optional):
            The index of the layer (needed with a cache). Default: `None`.
        norm_eps (float, Optional):
            The epsilon of the output norm. Default: 1e-5.
        lambda_lower_bound (float, Optional):
            The lower bound of `Λ`, positive. Default: 0.25.
        lambda_initial_value (float, Optional):
            The value of `Λ` at initialisation, above `lambda_lower_bound`. Default: 1.0.
        use_gamma_cap (bool, Optional):
            The paper's cap on the forget gate, `γ_t ← γ_t (1 - (1 - gamma_cap) β_t²)`, which keeps `H_t` bounded over
            runs of repeated tokens. Default: `True`.
        gamma_cap (float, Optional):
            `b` of the cap, in (0, 1]. Default: 0.9975.
        use_solver (bool, Optional):
            `False` skips the solve (`q* = q`), which makes the layer gated linear attention (the paper's baseline);
            `Λ` is then unused. Default: `True`.
        cg_max_steps_training (int, Optional):
            The most CG steps per token in training. Default: 30.
        cg_tol_training (float, Optional):
            The relative residual at which CG stops in training; `None` runs all steps. Default: 1e-4.
        cg_max_steps_inference (int, Optional):
            The most CG steps per token in inference (eval mode). Default: 30.
        cg_tol_inference (float, Optional):
            The relative residual at which CG stops in inference; `None` runs all steps. Default: 1e-4.
        precondition (bool or str, Optional):
            `True`: Jacobi-preconditioned CG; `False`: the paper's plain CG; `'chunk'`: the chunk preconditioner
            (op README) in the chunk mode, for long memories with keys on few directions, where Jacobi stalls;
            `'auto'`: Jacobi, then the chunk preconditioner for the tokens Jacobi leaves unconverged (straight
            away where Jacobi is predicted to stall). The `fused_recurrent` mode (decoding) has no chunk start and
            runs Jacobi then. Default: `'auto'`.
        chunk_size (int, Optional):
            The chunk size of `chunk_mesa`: 16, 32 or 64. Default: 64.
        warn_unconverged (bool, Optional):
            Warn (`RuntimeWarning`, one host sync per call) when a token's solve stops at its step limit without
            reaching the tolerance; `last_cg_unconverged` marks such tokens either way. Default: `False`.
        max_cg_step_training, max_cg_step_decoding (int, Optional):
            fla's names for `cg_max_steps_training` and `cg_max_steps_inference`, accepted for drop-in use.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 16,
        head_dim: int = 128,
        expand_v: float = 1.0,
        mode: str = 'chunk',
        use_output_gate: bool = False,
        use_short_conv: bool = True,
        use_v_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        layer_idx: int | None = None,
        norm_eps: float = 1e-5,
        lambda_lower_bound: float = 0.25,
        lambda_initial_value: float = 1.0,
        use_gamma_cap: bool = True,
        gamma_cap: float = 0.9975,
        use_solver: bool = True,
        cg_max_steps_training: int = 30,
        cg_tol_training: float | None = 1e-4,
        cg_max_steps_inference: int = 30,
        cg_tol_inference: float | None = 1e-4,
        precondition: bool | str = DEFAULT_PRECONDITION,
        chunk_size: int = 64,
        warn_unconverged: bool = False,
        max_cg_step_training: int | None = None,
        max_cg_step_decoding: int | None = None,
        **kwargs,
    ):
        super().__init__()
        if max_cg_step_training is not None:
            cg_max_steps_training = max_cg_step_training
        if max_cg_step_decoding is not None:
            cg_max_steps_inference = max_cg_step_decoding

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        _check('hidden_size', hidden_size, is_int(hidden_size) and hidden_size > 0, 'a positive int')
        _check('num_heads', num_heads, is_int(num_heads) and num_heads > 0, 'a positive int')
        _check('head_dim', head_dim, is_int(head_dim) and head_dim > 0, 'a positive int')
        _check('expand_v', expand_v, isinstance(expand_v, (int, float)) and expand_v > 0, 'a positive number')
        head_v_dim = head_dim * expand_v
        _check('expand_v', expand_v, math.isclose(head_v_dim, round(head_v_dim), rel_tol=1e-5),
               f'such that head_dim * expand_v is an int (head_dim = {head_dim})')
        _check('mode', mode, mode in ('chunk', 'fused_recurrent'), "'chunk' or 'fused_recurrent'")
        _check('conv_size', conv_size, is_int(conv_size) and conv_size >= 1, 'an int >= 1')
        _check('norm_eps', norm_eps, isinstance(norm_eps, (int, float)) and norm_eps > 0, 'a positive float')
        _check('lambda_lower_bound', lambda_lower_bound,
               isinstance(lambda_lower_bound, (int, float)) and lambda_lower_bound > 0, 'a positive float (Λ > 0)')
        _check('lambda_initial_value', lambda_initial_value,
               isinstance(lambda_initial_value, (int, float)) and lambda_initial_value > lambda_lower_bound,
               f'a float above lambda_lower_bound = {lambda_lower_bound}')
        _check('gamma_cap', gamma_cap, isinstance(gamma_cap, (int, float)) and 0 < gamma_cap <= 1, 'a float in (0, 1]')
        for name, value in (('cg_max_steps_training', cg_max_steps_training),
                            ('cg_max_steps_inference', cg_max_steps_inference)):
            _check(name, value, is_int(value) and value >= 0, 'a non-negative int')
        for name, value in (('cg_tol_training', cg_tol_training), ('cg_tol_inference', cg_tol_inference)):
            _check(name, value, value is None or (isinstance(value, (int, float)) and 0 <= value < 1),
                   'None or a float in [0, 1)')
        _check('chunk_size', chunk_size, chunk_size in (16, 32, 64), '16, 32 or 64')
        _check('precondition', precondition, is_precondition(precondition),
               "True (Jacobi), False (plain CG), 'chunk' or 'auto'")
        _check('warn_unconverged', warn_unconverged, isinstance(warn_unconverged, bool), 'a bool')
        _check('layer_idx', layer_idx, layer_idx is None or (is_int(layer_idx) and layer_idx >= 0), 'None or an int >= 0')

        self.mode = mode
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.expand_v = expand_v
        self.head_k_dim = head_dim
        self.head_v_dim = int(round(head_v_dim))
        self.key_dim = num_heads * self.head_k_dim
        self.value_dim = num_heads * self.head_v_dim
        self.use_output_gate = use_output_gate
        self.use_short_conv = use_short_conv
        self.use_v_conv = use_short_conv and use_v_conv
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.layer_idx = layer_idx
        self.lambda_lower_bound = float(lambda_lower_bound)
        self.lambda_initial_value = float(lambda_initial_value)
        self.use_gamma_cap = use_gamma_cap
        self.gamma_cap = float(gamma_cap)
        self.use_solver = use_solver
        self.cg_max_steps_training = cg_max_steps_training
        self.cg_tol_training = cg_tol_training
        self.cg_max_steps_inference = cg_max_steps_inference
        self.cg_tol_inference = cg_tol_inference
        self.precondition = precondition
        self.chunk_size = chunk_size
        self.warn_unconverged = warn_unconverged
        self._cg_record = None

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        # gates γ = σ(a), β = σ(b), one per head; the a bias sets the initial memory length
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.a_proj._is_mesa_gate = True
        # Λ = lambda_lower_bound + softplus(lambda_params), per head and key dimension, kept in float32
        self.lambda_params = nn.Parameter(torch.empty(self.key_dim, dtype=torch.float32))
        self.lambda_params._no_weight_decay = True

        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation='silu')
            self.k_conv1d = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation='silu')
            if self.use_v_conv:
                self.v_conv1d = ShortConvolution(self.value_dim, conv_size, bias=conv_bias, activation='silu')
        else:
            warnings.warn(
                "ShortConvolution is crucial to the performance. "
                "Do not turn it off, i.e., setting `use_short_conv=False` unless you know what you are doing.",
            )
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, dtype=torch.float32)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.reset_mesa_parameters()

    @torch.no_grad()
    def reset_mesa_parameters(self):
        """Initialises what generic initialisers do not know: `Λ` (to `lambda_initial_value`) and the γ gate's bias."""
        if self.lambda_params.device.type == 'meta':
            return
        # softplus⁻¹(Λ₀ − lower bound)
        self.lambda_params.fill_(math.log(math.expm1(self.lambda_initial_value - self.lambda_lower_bound)))
        init_gate_bias(self.a_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"use_solver={self.use_solver}, cg_training=({self.cg_max_steps_training}, {self.cg_tol_training}), "
            f"cg_inference=({self.cg_max_steps_inference}, {self.cg_tol_inference}), precondition={self.precondition}, "
            f"use_gamma_cap={self.use_gamma_cap}"
        )

    @property
    def last_cg_steps(self) -> torch.Tensor | None:
        """The CG steps of the last call, `[B, T, H]` int32 (both solves of 'auto'), on the device; `None` before one."""
        return None if self._cg_record is None else split_cg_steps(self._cg_record)[0].int()

    @property
    def last_cg_unconverged(self) -> torch.Tensor | None:
        """The tokens and heads of the last call whose solve stopped short of `cg_tol`, `[B, T, H]` bool."""
        return None if self._cg_record is None else split_cg_steps(self._cg_record)[1]

    def get_lambda(self) -> torch.Tensor:
        """`Λ` as `[H, K]` float32."""
        return (F.softplus(self.lambda_params.float()) + self.lambda_lower_bound).view(self.num_heads, self.head_k_dim)

    def _projections(self, x):
        """
        q, k, v and the gates' pre-activations a, b from `x`, and the biases of a and b where they are still to be
        added (by the gate).
        """
        projs = (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj)
        # With gradients, one GEMM over their weights (`fused_linears`): fla's short convs read its column views in
        # place and the gate adds its biases. v joins only on its way to a conv: the op needs it contiguous, and a
        # copy would be kept beside the view's base. Only for plain nn.Linear modules without hooks (an adapter or a
        # quantised module is called as it is); without gradients each module is called, as there the weights'
        # concatenation would be a copy every step of a decode
        if torch.is_grad_enabled() and all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)
                                           for m in projs):
            if self.use_v_conv:
                q, k, v, a, b = fused_linears(x, [m.weight for m in projs])
            else:
                q, k, a, b = fused_linears(x, [m.weight for m in projs if m is not self.v_proj])
                v = self.v_proj(x)
            return q, k, v, a, b, self.a_proj.bias, self.b_proj.bias
        return (*(m(x) for m in projs), None, None)

    def _conv(self, conv, x, cache, use_cache, cu_seqlens, fla_kernels):
        if fla_kernels:
            return conv(x=x, cache=cache, output_final_state=use_cache, cu_seqlens=cu_seqlens)
        return short_conv_torch(conv, x, cache=cache, output_final_state=use_cache, cu_seqlens=cu_seqlens)

    def _q(self, q, conv_state, use_cache, cu_seqlens, fla_kernels):
        """q from its projection: the short conv (or SiLU), `[B, T, H, K]`, and the conv's state."""
        if self.use_short_conv:
            q, conv_state = self._conv(self.q_conv1d, q, conv_state, use_cache, cu_seqlens, fla_kernels)
        else:
            q = F.silu(q)
        return q.unflatten(-1, (-1, self.head_k_dim)), conv_state

    def _normalised_q(self, q, cu_seqlens, fla_kernels):
        """q without a cache, L2-normalised as by the op: what the layer recomputes in the backward."""
        q, _ = self._q(q, None, False, cu_seqlens, fla_kernels)
        return qk_l2norm(q)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs: Unpack[dict],
    ) -> tuple[torch.Tensor, torch.Tensor | None, Cache | None]:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "Expected attention_mask as a 0-1 matrix with shape [batch_size, seq_len] for padding purposes "
                f"(0 indicating padding); arbitrary attention masks are not allowed, got shape {tuple(attention_mask.shape)}"
            )
        batch_size, q_len, _ = hidden_states.shape
        if torch.is_grad_enabled():
            mode = 'chunk'
        elif q_len <= 64 and not self.training:
            mode = 'fused_recurrent'
        else:
            mode = self.mode
        if self.training and mode != 'chunk':
            raise ValueError(f"Only chunk mode is supported in training, got mode `{mode}`")

        # fla's Triton modules (short conv, norms) run on GPUs and under TRITON_INTERPRET=1; elsewhere PyTorch does
        fla_kernels = use_triton(hidden_states)
        last_state = get_layer_cache(self, past_key_values)
        cu_seqlens = kwargs.get('cu_seqlens')
        hidden_states, indices, cu_seqlens = unpad_hidden_states(hidden_states, cu_seqlens, attention_mask, q_len)

        conv_state_q = conv_state_k = conv_state_v = None
        if last_state is not None and last_state.get('conv_state') is not None:
            conv_state_q, conv_state_k, *conv_state_v = last_state['conv_state']
            conv_state_v = conv_state_v[0] if conv_state_v else None
        # With gradients (and no cache), the normalised q is recomputed in the backward instead of kept for it: the
        # op keeps its solution x, not q, so q's L2 norm alone would keep its output (2 bytes per token and key unit
        # in bf16). The recompute keeps its input instead, q's projection (which the conv keeps anyway). On fla's
        # Triton conv, q's and k's conv and norm are one autograd node each (`short_conv_l2norm`, two kernels of
        # its own in place of fla's five: the same forward to the bit, which recomputes itself in its backward);
        # elsewhere a checkpoint recomputes q's (the same ops: the same results to the bit)
        recompute = torch.is_grad_enabled() and not use_cache and conv_state_q is None
        fused = recompute and fla_kernels and self.use_short_conv and self.q_conv1d.backend == 'triton'
        q, k, v, a, b, a_bias, b_bias = self._projections(hidden_states)
        if not recompute:
            q, conv_state_q = self._q(q, conv_state_q, use_cache, cu_seqlens, fla_kernels)
        if fused:
            k = short_conv_l2norm(self.k_conv1d, k, self.head_k_dim, cu_seqlens)
        elif self.use_short_conv:
            k, conv_state_k = self._conv(self.k_conv1d, k, conv_state_k, use_cache, cu_seqlens, fla_kernels)
        else:
            k = F.silu(k)
        if self.use_v_conv:
            v, conv_state_v = self._conv(self.v_conv1d, v, conv_state_v, use_cache, cu_seqlens, fla_kernels)

        # views, not einops: its parsing is host time in every layer of every decode step
        v = v.unflatten(-1, (-1, self.head_v_dim))
        if not fused:
            k = k.unflatten(-1, (-1, self.head_k_dim))
        # log γ (with the cap γ(1 − (1 − b)β²)) and β, float32; the fused gate keeps a's bf16 projection and β (which
        # the op keeps anyway) for its backward
        gate_fn = fused_mesa_gate if fla_kernels else naive_mesa_gate
        g, beta = gate_fn(a, b, self.gamma_cap if self.use_gamma_cap else None, a_bias, b_bias)
        if fused:
            q = short_conv_l2norm(self.q_conv1d, q, self.head_k_dim, cu_seqlens)
        elif recompute:
            q = checkpoint(self._normalised_q, q, cu_seqlens, fla_kernels, use_reentrant=False, preserve_rng_state=False)
            # k normalised by the same norm, here as q is (the op keeps the normalised k)
            k = qk_l2norm(k)
        lamb = self.get_lambda()

        if self.training:
            cg_max_steps, cg_tol = self.cg_max_steps_training, self.cg_tol_training
        else:
            cg_max_steps, cg_tol = self.cg_max_steps_inference, self.cg_tol_inference
        if not self.use_solver:
            cg_max_steps = 0

        recurrent_state = last_state['recurrent_state'] if last_state is not None else None
        op_kwargs = dict(
            initial_state=recurrent_state,
            output_final_state=use_cache,
            cg_max_steps=cg_max_steps,
            cg_tol=cg_tol,
            precondition=self.precondition,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=not recompute,
            # the steps with the unconverged tokens as ~n, one tensor, decoded only when asked for
            return_cg_steps='encoded',
            warn_unconverged=self.warn_unconverged,
            # Λ = softplus + a positive bound, g a log-sigmoid (plus the log of a factor in (0, 1]): valid by
            # construction, so no host sync to check them
            check_values=False,
        )
        if mode == 'chunk':
            o, recurrent_state, cg_steps = chunk_mesa(
                q, k, v, g, beta, lamb, chunk_size=self.chunk_size, **op_kwargs
            )
        elif mode == 'fused_recurrent':
            # one token at a time has no chunk start to factor: Jacobi there
            op_kwargs['precondition'] = op_kwargs['precondition'] is not False
            o, recurrent_state, cg_steps = fused_recurrent_mesa(q, k, v, g, beta, lamb, **op_kwargs)
        else:
            raise NotImplementedError(f"Not supported mode `{mode}`.")
        # the CG steps of the last call per token and head, and the tokens whose solve stopped short of cg_tol, kept
        # packed (`last_cg_steps`, `last_cg_unconverged` decode them): in training they stay alive through the
        # step's peak, so they take 1 byte a token and head instead of 5
        self._cg_record = pack_cg_steps(cg_steps, cg_max_steps)

        update_layer_cache(
            self,
            past_key_values,
            recurrent_state=recurrent_state,
            conv_state=((conv_state_q, conv_state_k, conv_state_v) if self.use_v_conv else (conv_state_q, conv_state_k))
            if self.use_short_conv else None,
            offset=q_len,
        )

        gate = None
        if self.use_output_gate:
            gate = self.g_proj(hidden_states).unflatten(-1, (-1, self.head_v_dim))
        if fla_kernels:
            o = self.o_norm(o, gate) if self.use_output_gate else self.o_norm(o)
        else:
            o = rms_norm_torch(self.o_norm, o, gate)
        o = self.o_proj(o.flatten(-2))
        o = repad_hidden_states(o, indices, batch_size, q_len)
        return o, None, past_key_values


@torch.no_grad()
def init_gate_bias(bias: torch.Tensor):
    """γ₀ = σ(bias) with 1 − γ₀ log-uniform in `GATE_INIT_DECAY_RANGE`, one per head."""
    lo, hi = (math.log(x) for x in GATE_INIT_DECAY_RANGE)
    # drawn in place, on the parameter itself: works on an FSDP2-sharded bias (a DTensor) too, where copying a
    # plain tensor in fails
    decay = bias.uniform_(lo, hi).exp_()
    bias.copy_(torch.log1p(-decay) - torch.log(decay))
