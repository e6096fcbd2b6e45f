# Copyright (c) 2026, fla-mesa contributors. MIT license.

from __future__ import annotations

import contextlib
import logging as pylogging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from fla.models.modeling_utils import FLAForCausalLM, FLAModel, FLAPreTrainedModel, get_attention
from fla.models.utils import FLAUnsupportedCacheGenerationMixin
from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss, GatedMLP, RMSNorm
from fla.modules.l2warp import l2_warp
from fla.ops.attnres import fused_attnres
from torch.nn import functional as F
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from fla_mesa.layers.mesa_net import MesaNet, init_gate_bias, rms_norm_torch
from fla_mesa.models.mesa_net.configuration_mesa_net import MesaConfig
from fla_mesa.ops.mesa.utils import use_triton

if TYPE_CHECKING:
    from fla.models.utils import Cache
    from transformers.processing_utils import Unpack


logger = logging.get_logger(__name__)


class MesaRMSNorm(RMSNorm):
    """fla's fused `RMSNorm` (same parameters), in PyTorch where Triton cannot run (a CPU without the interpreter)."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if use_triton(x):
            return super().forward(x, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
        if residual is not None:
            x = (x.float() + residual.float()) if residual_in_fp32 else x + residual
            residual = x
        y = rms_norm_torch(self, x)
        if prenorm:
            return y, (x if residual is None else residual)
        return y


class MesaMLP(GatedMLP):
    """fla's `GatedMLP` (same parameters), in PyTorch where Triton cannot run."""

    def forward(self, x, **kwargs):
        if use_triton(x):
            return super().forward(x, **kwargs)
        gate, y = self.gate_proj(x), self.up_proj(x)
        if self.hidden_act == 'powlu':
            raise NotImplementedError("hidden_act='powlu' needs fla's Triton kernels (a GPU or TRITON_INTERPRET=1)")
        return self.down_proj(F.silu(gate) * y)


class MesaCrossEntropyLoss(nn.Module):
    """
    The model's criterion, called as fla's `FLAForCausalLM` calls one: `(logits, labels)`, or `(hidden_states, labels,
    weight, bias)` when `config.fuse_linear_cross_entropy`. fla's fused losses where their Triton kernels run (a GPU, or
    `TRITON_INTERPRET=1`); elsewhere, where fla's refuse CPU tensors, the same loss in PyTorch, in float32 as the fused
    kernels compute it (with `use_l2warp`, fla's `l2_warp` on the logits, as fla's unfused path applies it). Reads
    the config's flags at every call, so changing them after construction works as it does in fla.
    """

    ignore_index = -100

    def __init__(self, config: MesaConfig, reduction: str = 'mean'):
        super().__init__()
        self.config = config
        self.reduction = reduction

    def forward(self, x, target, weight=None, bias=None):
        fused = use_triton(x)
        if weight is not None:
            if fused:
                criterion = FusedLinearCrossEntropyLoss(use_l2warp=self.config.use_l2warp, reduction=self.reduction)
                return criterion(x, target, weight, bias)
            logits = F.linear(x, weight, bias)
            loss = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), reduction=self.reduction)
            return l2_warp(loss, logits) if self.config.use_l2warp else loss
        if not self.config.fuse_cross_entropy:
            return F.cross_entropy(x, target, reduction=self.reduction)
        if fused:
            return FusedCrossEntropyLoss(inplace_backward=True, reduction=self.reduction)(x, target)
        return F.cross_entropy(x.float(), target, reduction=self.reduction)


class _DropCacheRename(pylogging.Filter):
    def filter(self, record):
        return '`past_key_values`/`cache_params` are deprecated' not in record.getMessage()


@contextlib.contextmanager
def _fla_cache_names():
    """
    fla 0.6's model code (`FLAModel.forward`, `FLAForCausalLM.forward`) builds transformers' outputs with
    `past_key_values=`, which transformers >= 5.24 renames to `cache`, logging a deprecation the user did not cause
    and cannot act on. Drops that one message while fla's forward runs (transformers logs it once per process).
    """
    logger = pylogging.getLogger('transformers.utils.generic')
    quiet = _DropCacheRename()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class MesaBlock(GradientCheckpointingLayer):

    def __init__(self, config: MesaConfig, layer_idx: int):
        super().__init__()

        self.config = config
        self.layer_idx = layer_idx

        self.attn_norm = (MesaRMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)
        self.attn = get_attention(config=config, layer_idx=layer_idx)
        if self.attn is None:
            self.attn = MesaNet(
                hidden_size=config.hidden_size,
                num_heads=config.num_heads,
                head_dim=config.head_dim,
                expand_v=config.expand_v,
                mode=config.attn_mode,
                use_output_gate=config.use_output_gate,
                use_short_conv=config.use_short_conv,
                use_v_conv=config.use_v_conv,
                conv_size=config.conv_size,
                layer_idx=layer_idx,
                norm_eps=config.norm_eps,
                lambda_lower_bound=config.lambda_lower_bound,
                lambda_initial_value=config.lambda_initial_value,
                use_gamma_cap=config.use_gamma_cap,
                gamma_cap=config.gamma_cap,
                use_solver=config.use_solver,
                cg_max_steps_training=config.cg_max_steps_training,
                cg_tol_training=config.cg_tol_training,
                cg_max_steps_inference=config.cg_max_steps_inference,
                cg_tol_inference=config.cg_tol_inference,
                precondition=config.precondition,
                chunk_size=config.chunk_size,
                warn_unconverged=config.warn_unconverged,
            )
        self.mlp_norm = (MesaRMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)
        self.mlp = MesaMLP(
            hidden_size=config.hidden_size,
            hidden_ratio=config.hidden_ratio,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            fuse_swiglu=config.fuse_swiglu,
        )

        self.use_attnres = config.attnres_block_size is not None
        if self.use_attnres:
            self.attn_res_proj = nn.Linear(in_features=config.hidden_size, out_features=1, bias=False)
            self.attn_res_norm = nn.RMSNorm(normalized_shape=config.hidden_size, eps=config.norm_eps)
            self.mlp_res_proj = nn.Linear(in_features=config.hidden_size, out_features=1, bias=False)
            self.mlp_res_norm = nn.RMSNorm(normalized_shape=config.hidden_size, eps=config.norm_eps)
            block_size = config.attnres_block_size
            self.attnres_is_attn_boundary = (2 * layer_idx) % block_size == 0
            self.attnres_is_mlp_boundary = (2 * layer_idx + 1) % block_size == 0
            self.attn_res_proj._is_attnres_proj = True
            self.mlp_res_proj._is_attnres_proj = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | list[torch.FloatTensor] | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        attnres_states: list[torch.Tensor] | None = None,
        **kwargs: Unpack[dict],
    ) -> tuple[torch.FloatTensor, tuple[torch.FloatTensor, torch.FloatTensor] | None]:
        if self.use_attnres:
            prefix_sum = hidden_states
            if attnres_states is None:
                # at the first layer attnres is the identity: apply the prenorm directly
                hidden_states = self.attn_norm(prefix_sum)
                attnres_states = [prefix_sum]
                prefix_sum = None
            else:
                residuals = [*attnres_states, prefix_sum]
                if self.attnres_is_attn_boundary:
                    attnres_states = residuals
                    prefix_sum = None
                hidden_states = fused_attnres(
                    query=self.attn_res_proj.weight,
                    residuals=residuals,
                    rms_weight=self.attn_res_norm.weight,
                    output_rms_weight=self.attn_norm.weight,
                    rms_eps=self.attn_res_norm.eps,
                )
        else:
            residual = hidden_states
            hidden_states = self.attn_norm(hidden_states)
        hidden_states, attentions, past_key_values = self.attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )

        if self.use_attnres:
            prefix_sum = hidden_states if prefix_sum is None else prefix_sum + hidden_states
            residuals = [*attnres_states, prefix_sum]
            if self.attnres_is_mlp_boundary:
                attnres_states = residuals
                prefix_sum = None
            hidden_states = fused_attnres(
                query=self.mlp_res_proj.weight,
                residuals=residuals,
                rms_weight=self.mlp_res_norm.weight,
                output_rms_weight=self.mlp_norm.weight,
                rms_eps=self.mlp_res_norm.eps,
            )
        elif self.config.fuse_norm:
            hidden_states, residual = self.mlp_norm(hidden_states, residual, True)
        else:
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.mlp_norm(hidden_states)
        hidden_states = self.mlp(hidden_states, **kwargs)

        if self.use_attnres:
            hidden_states = hidden_states if prefix_sum is None else prefix_sum + hidden_states
        else:
            hidden_states = residual + hidden_states

        return hidden_states, attentions, past_key_values, attnres_states


class MesaPreTrainedModel(FLAPreTrainedModel):

    config_class = MesaConfig
    base_model_prefix = 'model'
    supports_gradient_checkpointing = True
    _no_split_modules = ['MesaBlock']
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module, prenorm_residual_strategy: str | None = None, num_residuals_per_layer: int = 2):
        if isinstance(module, MesaNet):
            # the layer's own parameter, which generic initialisers skip: Λ = lambda_initial_value
            module.reset_mesa_parameters()
        elif isinstance(module, (nn.Linear, nn.Conv1d)):
            if getattr(module, '_is_attnres_proj', False):
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                if getattr(module, '_is_mesa_gate', False):
                    init_gate_bias(module.bias)
                else:
                    nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif hasattr(module, 'reset_parameters'):
            module.reset_parameters()

        if prenorm_residual_strategy is not None:
            # scale residual weights by 1/sqrt(N), N the number of residual layers (GPT-2)
            p = None
            if hasattr(module, 'o_proj'):
                p = module.o_proj.weight
            elif hasattr(module, 'down_proj'):
                p = module.down_proj.weight
            if p is not None:
                if prenorm_residual_strategy == 'rescale':
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                    with torch.no_grad():
                        p /= math.sqrt(num_residuals_per_layer * self.config.num_hidden_layers)
                elif prenorm_residual_strategy == 'zero':
                    nn.init.zeros_(p)
                else:
                    raise ValueError(f"Invalid prenorm_residual_strategy: {prenorm_residual_strategy}")


class MesaModel(MesaPreTrainedModel, FLAModel):

    def __init__(self, config: MesaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MesaBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = (MesaRMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)

        self.use_attnres = config.attnres_block_size is not None
        if self.use_attnres:
            self.res_proj = nn.Linear(in_features=config.hidden_size, out_features=1, bias=False)
            self.res_norm = nn.RMSNorm(normalized_shape=config.hidden_size, eps=config.norm_eps)
            self.res_proj._is_attnres_proj = True

        self.gradient_checkpointing = False

        self.post_init()

    def forward(self, *args, **kwargs):
        with _fla_cache_names():
            return super().forward(*args, **kwargs)


class MesaForCausalLM(MesaPreTrainedModel, FLAForCausalLM, FLAUnsupportedCacheGenerationMixin):

    _tied_weights_keys = {'lm_head.weight': 'model.embeddings.weight'}

    def __init__(self, config: MesaConfig):
        super().__init__(config)
        self.model = MesaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion = MesaCrossEntropyLoss(config)

        self.post_init()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        logits_to_keep: int | torch.Tensor | None = None,
        cache_position: torch.LongTensor | None = None,
        next_sequence_length: int | None = None,
        is_first_iteration: bool = False,
        **kwargs,
    ):
        # fla 0.6's version (same arguments, same steps) hands transformers' the cache as `past_key_values`, the name
        # transformers >= 5.24 deprecates: two FutureWarnings per generate() call. The current name here
        if cache_position is not None and next_sequence_length is None:
            next_sequence_length = len(cache_position)
        if logits_to_keep is not None:
            kwargs['logits_to_keep'] = logits_to_keep
        model_inputs = GenerationMixin.prepare_inputs_for_generation(
            self,
            input_ids=input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            use_cache=use_cache,
            **kwargs,
        )
        # after the prefill every new token is generate()'s own, unmasked: without attention layers the mask has
        # nothing left to do, and the layers would unpad by it every step (an index sync and two copies a layer)
        # (transformers < 5.24 names the cache `past_key_values`)
        cache = cache if cache is not None else kwargs.get('past_key_values')
        if not is_first_iteration and self.config.attn is None and cache is not None and cache.get_seq_length() > 0:
            model_inputs['attention_mask'] = None
        return model_inputs

    def forward(self, *args, cache=None, logits_to_keep: int | torch.Tensor | None = 0, decode_graph: bool = True,
                **kwargs):
        # transformers >= 5.24 hands the generation cache over as `cache`, its new name for `past_key_values`;
        # fla's forward would take it as an unknown keyword and decode every new token from an empty state
        if cache is not None:
            if kwargs.get('past_key_values') is not None:
                raise TypeError("pass the recurrent cache as `cache` or as `past_key_values`, not both")
            kwargs['past_key_values'] = cache
        # `logits_to_keep` named in the signature: generate() then asks for the last position's logits only (its
        # prefill would otherwise compute [B, T, vocab] logits to use one row)
        kwargs['logits_to_keep'] = logits_to_keep
        if decode_graph and self.config.decode_cuda_graph and not args:
            out = self._graph_decode(**kwargs)
            if out is not None:
                return out
        with _fla_cache_names():
            return super().forward(*args, **kwargs)

    def _graph_decode(self, input_ids=None, past_key_values=None, use_cache=None, return_dict=None,
                      logits_to_keep=0, **kwargs):
        """
        The decode step as a replayed CUDA graph (`config.decode_cuda_graph`), where it applies: one new token per
        sequence from a cache, no gradient, no mask, nothing else asked; `None` elsewhere (eager). Off CUDA the
        same step runs eagerly on the static buffers (no gain: what the CPU tests check).
        """
        if (input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1
                or past_key_values is None or use_cache is False or return_dict is False
                or logits_to_keep not in (0, 1, None)
                # positions mean nothing to a recurrent model: anything else asked for decodes eagerly
                or any(v is not None and v is not False
                       for k, v in kwargs.items() if k not in ('cache_position', 'position_ids'))
                or self.training or torch.is_grad_enabled()
                or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())
                or self.config.attn is not None or self.config.warn_unconverged
                or len(past_key_values) != self.config.num_hidden_layers or past_key_values.get_seq_length() == 0):
            return None
        from fla_mesa.models.mesa_net.decode_graph import MesaDecodeGraph, parameters_key
        graphs = self.__dict__.setdefault('_decode_graphs', {})
        B = input_ids.shape[0]
        # once a generation, at its first step (a cache not yet adopted), not every token: parameters replaced since
        # the capture (`model.to(dtype)`, new tensors assigned) make every graph stale
        graph = graphs.get(B)
        if graph is not None and not graph.owns(past_key_values) and graph.parameters_key != parameters_key(self):
            graphs.clear()
        if B not in graphs:
            graphs[B] = MesaDecodeGraph(self, past_key_values)
        logits = graphs[B].step(input_ids, past_key_values)
        with _fla_cache_names():
            return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)

    def reset_decode_graphs(self):
        """Frees the CUDA graphs and buffers of `config.decode_cuda_graph` (kept per batch size)."""
        self.__dict__.pop('_decode_graphs', None)
