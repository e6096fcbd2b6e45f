# Copyright (c) 2026, fla-mesa contributors. MIT license.

__version__ = '0.1.0'

from fla_mesa.ops import chunk_mesa, fused_recurrent_mesa  # noqa: E402

__all__ = ['chunk_mesa', 'fused_recurrent_mesa']
