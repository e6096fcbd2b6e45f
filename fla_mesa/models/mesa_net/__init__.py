# Copyright (c) 2026, fla-mesa contributors. MIT license.

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fla_mesa.models.mesa_net.configuration_mesa_net import MesaConfig
from fla_mesa.models.mesa_net.decode_graph import MesaDecodeGraph
from fla_mesa.models.mesa_net.modeling_mesa_net import MesaBlock, MesaForCausalLM, MesaModel, MesaPreTrainedModel

AutoConfig.register(MesaConfig.model_type, MesaConfig, exist_ok=True)
AutoModel.register(MesaConfig, MesaModel, exist_ok=True)
AutoModelForCausalLM.register(MesaConfig, MesaForCausalLM, exist_ok=True)

__all__ = ['MesaBlock', 'MesaConfig', 'MesaDecodeGraph', 'MesaForCausalLM', 'MesaModel', 'MesaPreTrainedModel']
