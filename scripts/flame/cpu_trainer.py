# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
flame's trainer on a CPU, for checking the flame integration without a GPU: torchtitan 0.1.0 has no CPU mode (it
takes CUDA when no accelerator is found), so its device is pointed at the CPU and the CUDA-only pieces (memory
monitor, set_device, the timeout-setting barrier) are stubbed; then it runs as `train_mesa.py`. Processes talk
over gloo. Use it as run_gpu.sh's TRAINER with a small config (docs/flame.md, "Verified on a CPU").
"""

import runpy
from types import SimpleNamespace

import torch
import torchtitan.components.metrics as metrics
import torchtitan.distributed.utils as dist_utils
import torchtitan.tools.utils as tools_utils

import fla_mesa.models  # noqa: F401


class CPUMemoryMonitor:
    device_name = 'cpu'

    def get_peak_stats(self):
        return SimpleNamespace(max_active_gib=0, max_active_pct=0, max_reserved_gib=0, max_reserved_pct=0,
                               num_alloc_retries=0, num_ooms=0)

    def reset_peak_stats(self):
        pass


tools_utils.device_type, tools_utils.device_module = 'cpu', torch.cpu
dist_utils.device_type, dist_utils.device_module = 'cpu', torch.cpu
dist_utils.set_pg_timeouts = lambda **kwargs: None
metrics.build_device_memory_monitor = CPUMemoryMonitor
if not hasattr(torch.cpu, 'set_device'):
    torch.cpu.set_device = lambda device: None

if __name__ == '__main__':
    runpy.run_module('flame.train', run_name='__main__', alter_sys=True)
