# Copyright (c) 2026, fla-mesa contributors. MIT license.

from fla_mesa.ops.mesa import chunk_mesa, chunk_mesa_net, fused_recurrent_mesa, mesa_net_decoding_one_step

__all__ = ['chunk_mesa', 'chunk_mesa_net', 'fused_recurrent_mesa', 'mesa_net_decoding_one_step']
