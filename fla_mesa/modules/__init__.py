# Copyright (c) 2026, fla-mesa contributors. MIT license.

from fla_mesa.modules.projections import fused_linears

__all__ = ['fused_linears']
