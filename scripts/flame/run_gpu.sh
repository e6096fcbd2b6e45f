#!/usr/bin/env bash
# On the GPU machine, from the repo root, with .flame/ and .whl_flame/ carried (scripts/flame/prepare_device.sh) and
# fla's wheels in .whl/: flame trains scripts/flame/mesa_tiny.json on a generated local corpus, converts its last DCP
# checkpoint to Hugging Face format and checks that (scripts/flame/check_hf.py). The global batch is the same for
# any NGPU: GLOBAL_BATCH sequences of SEQ_LEN tokens a step, split over the GPUs (FSDP2 when NGPU > 1).
#   NGPU=1 bash scripts/flame/run_gpu.sh; NGPU=2 bash scripts/flame/run_gpu.sh
# EXTRA adds flame arguments, e.g. EXTRA='--activation_checkpoint.mode full' or EXTRA='--training.compile'.
set -euo pipefail
NGPU=${NGPU:-1}
STEPS=${STEPS:-300}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
SEQ_LEN=${SEQ_LEN:-2048}
RESULTS=${OUT:-/tmp/flame_out}
PY=${PY:-python3}
CONFIG=${CONFIG:-$PWD/scripts/flame/mesa_tiny.json}
TRAINER=${TRAINER:-$PWD/scripts/flame/train_mesa.py}
NAME=${NAME:-mesa-${NGPU}gpu}
ROOT=$PWD
DUMP=/tmp/exp/$NAME
mkdir -p "$RESULTS"

if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_flame/*.whl $(ls .whl/*.whl 2>/dev/null)
fi
export PYTHONPATH=/tmp/site:$ROOT/.flame:$ROOT${PYTHONPATH:+:$PYTHONPATH}
# NVLink multicast stays off (the device's rule); wandb is off in mesa.toml
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
$PY -c "import torch, triton, fla, torchtitan, datasets, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'gpus', torch.cuda.device_count())" | tee "$RESULTS/$NAME.versions"

CORPUS=/tmp/mesa_corpus
[ -f $CORPUS/corpus.jsonl ] || $PY scripts/flame/make_corpus.py --out $CORPUS --docs ${DOCS:-20000}

cd .flame
rm -rf "$DUMP"
$PY -m torch.distributed.run --nnodes 1 --nproc_per_node "$NGPU" --rdzv_backend c10d --rdzv_endpoint localhost:0 --local-ranks-filter 0 \
  "$TRAINER" \
  --job.config_file "$ROOT/scripts/flame/mesa.toml" \
  --job.dump_folder "$DUMP" \
  --model.config "$CONFIG" \
  --model.tokenizer_path $CORPUS/tokenizer \
  --training.data_files $CORPUS/corpus.jsonl \
  --training.batch_size $((GLOBAL_BATCH / NGPU)) \
  --training.seq_len "$SEQ_LEN" --training.context_len "$SEQ_LEN" \
  --training.steps "$STEPS" \
  ${EXTRA:-} 2>&1 | tee "$RESULTS/$NAME.log"

$PY "$ROOT/scripts/flame/train_mesa.py" --convert --path "$DUMP" --step "$STEPS" \
  --config "$CONFIG" --tokenizer $CORPUS/tokenizer 2>&1 | tail -3
cd "$ROOT"
$PY scripts/flame/check_hf.py --path "$DUMP" --step "$STEPS" 2>&1 | tee "$RESULTS/$NAME.check_hf"
