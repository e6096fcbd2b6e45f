# Copyright (c) 2026, fla-mesa contributors. MIT license.

import warnings

__version__ = '0.1.0'

with warnings.catch_warnings():
    # fla warns at its first import on a machine without a GPU driver that Triton "rolls back to CPU": here that is
    # expected (every module has a PyTorch path on the CPU), so the import of fla made on the user's behalf is quiet
    warnings.filterwarnings('ignore', message='Triton is not supported on current platform', category=UserWarning)
    # importing the models registers `model_type="mesa"` with transformers' Auto classes
    from fla_mesa import models  # noqa: F401
    from fla_mesa.layers import MesaNet
    from fla_mesa.models import MesaConfig, MesaForCausalLM, MesaModel
    from fla_mesa.ops import chunk_mesa, fused_recurrent_mesa

__all__ = ['MesaConfig', 'MesaForCausalLM', 'MesaModel', 'MesaNet', 'chunk_mesa', 'fused_recurrent_mesa']
