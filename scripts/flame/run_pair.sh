#!/usr/bin/env bash
# On a two-GPU machine, from the repo root, in one go (issue 17): Triton's compile pass for the model's kernels, in
# parallel processes (benchmarks/benchmark_training.py's, every autotuned kernel cut to its share of the configs; the
# binaries land in TRITON_CACHE_DIR, and the Mesa kernels' binaries do not depend on the model's width), then
# run_gpu.sh on one GPU and on two (FSDP2), the loss plot, and everything packed into $OUT: flame_logs.tgz (logs,
# versions, HF checks, plot; packed again whenever the script ends, a time limit's kill included) and
# triton_cache.tgz.* (the compiled binaries in 15 MB parts, for a later call to carry in .triton_cache/).
# Both runs and the compile pass took ~11 minutes on a fresh machine, more than one call: GPUS='1' or GPUS='2' runs one.
#   bash scripts/flame/run_pair.sh; GPUS=2 bash scripts/flame/run_pair.sh
set -uo pipefail
ROOT=$PWD
FINAL=${OUT:?run on the device machine, where OUT is set}
LOGS=/tmp/flame_out
mkdir -p $LOGS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl_flame/*.whl .whl/*.whl
export PYTHONPATH=/tmp/site:$ROOT TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache} PYTHONUNBUFFERED=1
if ls .triton_cache/triton_cache.tgz.* > /dev/null 2>&1; then
  mkdir -p $TRITON_CACHE_DIR && cat .triton_cache/triton_cache.tgz.* | tar -xz -C $TRITON_CACHE_DIR
fi
pack() { python3 scripts/flame/plot_loss.py --out $LOGS/flame_loss.png $LOGS/mesa-*gpu.log > $LOGS/plot.txt 2>&1
         cat $LOGS/plot.txt; tar -czf $FINAL/flame_logs.tgz -C $LOGS .; }
save_cache() { rm -f $FINAL/triton_cache.tgz.*; tar -cz -C $TRITON_CACHE_DIR . | split -b 15M - $FINAL/triton_cache.tgz.; }
trap pack EXIT

t0=$(date +%s)
python3 scripts/flame/make_corpus.py --out /tmp/mesa_corpus --docs ${DOCS:-20000} > $LOGS/corpus.log 2>&1 &
n=$(python3 -c "import benchmarks.benchmark_training as b; print(b.mesa_config_count())")
for i in $(seq 0 $((n - 1))); do
  TRITON_CACHE_AUTOTUNING=0 timeout 400 python3 benchmarks/benchmark_training.py --compile-only --no-warm \
    --models fla-mesa --sizes small --Ts 2048 --config-slice $i $n > $LOGS/warm$i.log 2>&1 &
done
wait
echo "compile pass and corpus: $(( $(date +%s) - t0 )) s"; tail -n 2 $LOGS/warm*.log
save_cache
for g in ${GPUS:-1 2}; do
  t0=$(date +%s)
  OUT=$LOGS NGPU=$g SKIP_INSTALL=1 bash scripts/flame/run_gpu.sh > $LOGS/run$g.out 2>&1
  echo "NGPU=$g: exit $? in $(( $(date +%s) - t0 )) s"; grep -E "step: *(1|50|100|200|300) " $LOGS/run$g.out | tail -5
  tail -n 4 $LOGS/run$g.out
  pack
done
save_cache
ls -la $FINAL
