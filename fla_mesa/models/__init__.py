# Copyright (c) 2026, fla-mesa contributors. MIT license.

from fla_mesa.models.mesa_net import (
    MesaBlock, MesaConfig, MesaDecodeGraph, MesaForCausalLM, MesaModel, MesaPreTrainedModel,
)

__all__ = ['MesaBlock', 'MesaConfig', 'MesaDecodeGraph', 'MesaForCausalLM', 'MesaModel', 'MesaPreTrainedModel']
