# Copyright (c) 2026, fla-mesa contributors. MIT license.

__version__ = '0.1.0'

# importing the models registers `model_type="mesa"` with transformers' Auto classes
from fla_mesa import models  # noqa: E402, F401
from fla_mesa.layers import MesaNet  # noqa: E402
from fla_mesa.models import MesaConfig, MesaForCausalLM, MesaModel  # noqa: E402
from fla_mesa.ops import chunk_mesa, fused_recurrent_mesa  # noqa: E402

__all__ = ['MesaConfig', 'MesaForCausalLM', 'MesaModel', 'MesaNet', 'chunk_mesa', 'fused_recurrent_mesa']
