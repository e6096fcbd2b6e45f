# Copyright (c) 2026, fla-mesa contributors. MIT license.

from fla_mesa.ops.mesa import chunk_mesa, fused_recurrent_mesa

__all__ = ['chunk_mesa', 'fused_recurrent_mesa']
