#!/usr/bin/env bash
# The GPU benchmarks as named suites; the figures they print are the ones kept in bench/RESULTS.md.
#
#   bash bench/gpu_session.sh SUITE        SUITE: build | train | data | serve | kernels | all
#
#   build    the real-size graft: build + audit + save (bench_build.py)
#   train    the seeds' recipe as the baseline, then every stage end to end through the product (bench_train_run.py):
#            align at batch 16, at the default 4 and at 8, align-head, finetune, full
#   data     the loader alone: stock processor against uint8 tiles (bench_data.py)
#   serve    plain generate() against the engine, with and without --compile (bench_serve.py)
#   kernels  attention kernels, the frozen vision tower's compile variants, ragged cuDNN attention
#
# Environment: OUT (default bench/out, ignored by git) gets results.jsonl (one JSON line per run, a {"failed": ...}
# line for a run that failed or ran past its limit), stderr.log and env.txt. BASE=DIR (a checkout of another
# commit) runs each train run a second time from DIR's own bench/ and src/, alternated, for an A/B on one machine.
# Wheels carried in .whl/ are installed to /tmp/site first (the lent machines have no network).
set -u
case "${1:-}" in
  build | train | data | serve | kernels) SUITES=$1 ;;
  all) SUITES="build train data serve kernels" ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
SITE=""
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && SITE=/tmp/site:
fi
export PYTHONPATH=$SITE$PWD/src
OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT"

# run LIMIT CMD...: one bench command under a time limit; its JSON lines go to results.jsonl
run() {
  local limit=$1
  shift
  echo "+ $*" >&2
  timeout "$limit" "$@" 2>>"$OUT/stderr.log" | grep '^{"' | tee -a "$OUT/results.jsonl"
  local status=${PIPESTATUS[0]}
  [ "$status" = 0 ] || echo "{\"failed\": \"$*\", \"status\": $status}" | tee -a "$OUT/results.jsonl"
}

# train LIMIT ARGS...: bench_train_run.py with ARGS, then (with BASE) the same from BASE's checkout
train() {
  local limit=$1
  shift
  run "$limit" python3 bench/bench_train_run.py --root /tmp/vg-real "$@"
  if [ -n "${BASE:-}" ]; then
    run "$limit" env PYTHONPATH="$SITE$BASE/src" python3 "$BASE/bench/bench_train_run.py" --root /tmp/vg-real "$@"
  fi
}

suite_build() {
  run 240 python3 bench/bench_build.py --root /tmp/vg-real
}

suite_train() {
  run 120 python3 bench/bench_train.py --mode seed --steps 6
  train 240 --steps 60 --batch 16
  train 120 --steps 80 --batch 4 --packing
  train 120 --steps 60 --batch 8 --packing
  train 120 --steps 60 --batch 16 --stage align-head
  train 130 --steps 40 --batch 8 --stage finetune --packing
  train 150 --steps 40 --batch 8 --stage full
}

suite_data() {
  run 170 python3 bench/bench_data.py --workers 16 --seconds 25 --modes processor,uint8
  run 90 python3 bench/bench_data.py --workers 12 --seconds 20 --rows 128 --batch 16 --modes uint8
}

suite_serve() {
  run 560 python3 bench/bench_serve.py --new-tokens 128
}

suite_kernels() {
  run 150 python3 bench/bench_attention.py
  run 300 python3 bench/bench_vision_tower.py
  run 120 python3 bench/bench_varlen.py
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/env.txt"
python3 -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__)" \
  | tee -a "$OUT/env.txt"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$OUT/env.txt"
for suite in $SUITES; do
  "suite_$suite"
done
