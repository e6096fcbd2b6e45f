# Copyright (c) 2026, fla-mesa contributors. MIT license.
# All metadata lives in pyproject.toml (the version in fla_mesa/__init__.py); this file is for `setup.py develop` users.
from setuptools import setup

setup()
