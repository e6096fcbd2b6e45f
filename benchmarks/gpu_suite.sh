#!/usr/bin/env bash
# Every GPU check and measurement of the project: the test suite on the GPU (kernels, layer and model there), the
# recurrent kernel's hanging cases (tools/probe_recurrent.py), every
# kernel config against float64 (a compiler can miscompile one), the chunk table (speed beside fla, GLA, GDN, sdpa;
# accuracy against float64 beside the bf16 rounding floor) and, given an fla checkout, fla's own harness.
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [FLA_ROOT]
set -uo pipefail
out=${1:-benchmarks/results/latest}
fla_root=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# with pytest-timeout, a test stuck in a GPU kernel (past Python's reach) has its stacks dumped and its worker
# replaced, so the log names it; -v logs each result as it comes
timeout_opts=$(python -c 'import pytest_timeout' 2>/dev/null && echo --timeout=300 --timeout-method=thread)
python -m pytest tests -n 8 -v -p no:cacheprovider -rf --tb=short $timeout_opts 2>&1 | tee "$out/pytest.log" | tail -30
python benchmarks/tools/probe_recurrent.py --jobs 8 2>&1 | tee "$out/probe_recurrent.md"
python benchmarks/tools/check_configs.py --dtypes bf16 --shapes 32x16 64x32 128x128 --jobs 16 --out "$out/check_configs.md"
python benchmarks/warm_cache.py --jobs 8 2>&1 | tee "$out/warm_cache.log"
python benchmarks/benchmark_chunk.py 2>&1 | tee "$out/chunk.md"
python benchmarks/tools/benchmark_chunk_bwd_kernels.py --out "$out/chunk_bwd_kernels.md"
if [ -n "$fla_root" ]; then
    python benchmarks/fla_harness.py --fla-root "$fla_root" --modes fwd fwdbwd 2>&1 | tee "$out/fla_harness.md"
fi
