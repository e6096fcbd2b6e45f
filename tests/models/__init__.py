# Copyright (c) 2026, fla-mesa contributors. MIT license.
