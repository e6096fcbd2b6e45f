# Copyright (c) 2026, fla-mesa contributors. MIT license.

from fla_mesa.layers.mesa_net import MesaNet

__all__ = ['MesaNet']
