# Copyright (c) 2026, fla-mesa contributors. MIT license.

from fla_mesa.ops.mesa.chunk import chunk_mesa
from fla_mesa.ops.mesa.naive import naive_chunk_mesa, naive_exact_mesa, naive_recurrent_mesa

try:
    from fla_mesa.ops.mesa.fused_recurrent import fused_recurrent_mesa
except ImportError:  # pragma: no cover - lands with the fused-recurrent kernel
    fused_recurrent_mesa = None

__all__ = [
    'chunk_mesa',
    'fused_recurrent_mesa',
    'naive_chunk_mesa',
    'naive_exact_mesa',
    'naive_recurrent_mesa',
]
