# Copyright (c) 2026, fla-mesa contributors. MIT license.

from fla_mesa.ops.mesa.chunk import chunk_mesa
from fla_mesa.ops.mesa.fused_recurrent import fused_recurrent_mesa
from fla_mesa.ops.mesa.gate import fused_mesa_gate, naive_mesa_gate
from fla_mesa.ops.mesa.mesa_net import chunk_mesa_net, mesa_net_decoding_one_step
from fla_mesa.ops.mesa.naive import naive_chunk_mesa, naive_exact_mesa, naive_recurrent_mesa

__all__ = [
    'chunk_mesa',
    'chunk_mesa_net',
    'fused_mesa_gate',
    'fused_recurrent_mesa',
    'mesa_net_decoding_one_step',
    'naive_chunk_mesa',
    'naive_exact_mesa',
    'naive_mesa_gate',
    'naive_recurrent_mesa',
]
