# Copyright (c) 2026, fla-mesa contributors. MIT license.

from __future__ import annotations

import os


def is_interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (Triton's own switch, `TRITON_INTERPRET=1`)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'
