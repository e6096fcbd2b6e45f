# Copyright (c) 2026, fla-mesa contributors. MIT license.

from __future__ import annotations

from fla.models.configuration_utils import AttentionConfig, AttentionConfigBase, validate_attnres_config, validate_loss_config
from transformers.configuration_utils import PretrainedConfig

from fla_mesa.ops.mesa.precond import DEFAULT_PRECONDITION


class MesaConfig(AttentionConfigBase, PretrainedConfig):
    """
    Configuration of `MesaModel` / `MesaForCausalLM`: fla's `MesaNetConfig` fields plus the options of
    `fla_mesa.layers.MesaNet` (see its docstring). `model_type='mesa'` keeps it apart from fla's own `mesa_net`.
    fla's `max_cg_step_training` and `max_cg_step_decoding` are accepted (and readable) as the names of
    `cg_max_steps_training` and `cg_max_steps_inference`. On a CPU without Triton every fused module (norms, MLP,
    convolutions, the cross-entropy loss) runs in PyTorch by itself, with the same parameters.
    `decode_cuda_graph=True`: on CUDA, `generate()` replays each decode step (one token per sequence) as a CUDA graph,
    captured at the first step of each batch size (`MesaDecodeGraph`); the same tokens as eager decoding, without
    the host's per-kernel launch cost (on a CPU the same step runs eagerly). Models with attention layers (`attn`)
    decode eagerly.
    """

    model_type = 'mesa'
    keys_to_ignore_at_inference = ['past_key_values']
    # fla's MesaNetConfig names read and write the fields they stand for (one value, saved once)
    attribute_map = {'max_cg_step_training': 'cg_max_steps_training', 'max_cg_step_decoding': 'cg_max_steps_inference'}

    def __init__(
        self,
        attn_mode: str = 'chunk',
        hidden_size: int = 2048,
        expand_v: float = 1.0,
        use_output_gate: bool = False,
        use_short_conv: bool = True,
        use_v_conv: bool = False,
        conv_size: int = 4,
        num_heads: int = 16,
        head_dim: int = 128,
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
        decode_cuda_graph: bool = False,
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = 'swish',
        num_hidden_layers: int = 24,
        norm_eps: float = 1e-6,
        attn: AttentionConfig | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        attnres_block_size: int | None = None,
        max_cg_step_training: int | None = None,
        max_cg_step_decoding: int | None = None,
        **kwargs,
    ):
        # a config saved by fla's MesaNetConfig says model_type 'mesa_net': this class's own type, not the saved one,
        # so that a model built from it saves and reloads as this package's
        kwargs.pop('model_type', None)
        # fla's MesaNetConfig names for cg_max_steps_training / cg_max_steps_inference, so its configs load unchanged
        if max_cg_step_training is not None:
            cg_max_steps_training = max_cg_step_training
        if max_cg_step_decoding is not None:
            cg_max_steps_inference = max_cg_step_decoding
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.expand_v = expand_v
        self.use_output_gate = use_output_gate
        self.use_short_conv = use_short_conv
        self.use_v_conv = use_v_conv
        self.conv_size = conv_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.lambda_lower_bound = lambda_lower_bound
        self.lambda_initial_value = lambda_initial_value
        self.use_gamma_cap = use_gamma_cap
        self.gamma_cap = gamma_cap
        self.use_solver = use_solver
        self.cg_max_steps_training = cg_max_steps_training
        self.cg_tol_training = cg_tol_training
        self.cg_max_steps_inference = cg_max_steps_inference
        self.cg_tol_inference = cg_tol_inference
        self.precondition = precondition
        self.chunk_size = chunk_size
        self.warn_unconverged = warn_unconverged
        self.decode_cuda_graph = decode_cuda_graph
        self.max_position_embeddings = max_position_embeddings

        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range

        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.attnres_block_size = attnres_block_size

        validate_loss_config(fuse_cross_entropy=fuse_cross_entropy, fuse_linear_cross_entropy=fuse_linear_cross_entropy)
        validate_attnres_config(attnres_block_size=attnres_block_size)

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
