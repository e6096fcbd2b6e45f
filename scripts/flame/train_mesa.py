# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
flame's trainer (`python -m flame.train`) with fla-mesa's model registered first: run it under torchrun from a
flame checkout, with the same arguments as flame's `train.sh` passes.

flame's `--experimental.custom_model_path` calls `torchtitan.tools.utils.import_module_from_path`, which torchtitan
removed in March 2025, before the commit flame pins (0b44d4c, in torchtitan 0.1.0): with that torchtitan the option
fails with AttributeError. Importing `fla_mesa.models` here registers `model_type: "mesa"` with transformers' Auto
classes instead.
"""

import runpy
import sys

import fla_mesa.models  # noqa: F401

if __name__ == '__main__':
    module = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in ('--convert', '--train') else '--train'
    runpy.run_module('flame.utils.convert_dcp_to_hf' if module == '--convert' else 'flame.train', run_name='__main__',
                     alter_sys=True)
