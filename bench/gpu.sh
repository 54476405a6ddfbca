#!/usr/bin/env bash
# Every GPU check of vtcompile in one script, for a lent GPU machine (see ../shared docs / the device tool):
# full llava-1.5-7b geometry, bf16, random weights; prefill and generate, inductor (CUDA graphs for the decode
# step), unpruned vs fastv vs fitprune@0.5, batch 1 and 16; plus the CUDA test file. Budget: <= 8 minutes.
#
#   bash bench/gpu.sh [OUT_DIR]        (on the device machine: OUT_DIR defaults to $OUT)
#
# Needs only what the machine's image has (python3 with a CUDA build of torch, transformers, onnx); vtcompile
# runs from this checkout (PYTHONPATH), its own requirements already satisfied there. Wheels for anything missing
# can be carried in .whl/ (installed with --no-index). Each step has its own time limit, so one slow step cannot
# eat the others' minutes; every table lands in OUT_DIR with the GPU named, and a step that fails says so in
# OUT_DIR/gpu-summary.md instead of stopping the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
summary="$out/gpu-summary.md"
{
  echo "# vtcompile GPU checks"
  echo
  echo "- date: $(date -u +%F)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo unknown)"
  echo "- $(python3 -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.version.cuda}")' 2>&1)"
  echo
} > "$summary"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "- $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)$( [ $rc -eq 124 ] && echo ': TIMED OUT')" >> "$summary"
  tail -n 3 "$out/$name.log" | sed 's/^/    /' >> "$summary"
}

# 1. prefill: every pruned program vs unpruned on eager and inductor, batch 1 and 16 (ratios in one run)
step speed 200 python3 bench/speed.py --model llava-1.5-7b --random-weights --dtype bfloat16 --device cuda \
  --variant fastv --variant fitprune:budget=0.5 --targets eager,inductor --batch 1 --batch 16 --runs 10 --warmup 2 \
  --out "$out/speed-llava-1.5-7b-bfloat16-cuda.md"
# 2. generate: TTFT, decode ms/token and tokens/s vs transformers' generate; the decode step under CUDA graphs
step generate 200 python3 bench/generate.py --model llava-1.5-7b --random-weights --dtype bfloat16 --device cuda \
  --variant fastv --variant fitprune:budget=0.5 --targets inductor --batch 1 --batch 16 --new-tokens 64 --runs 3 \
  --out "$out/generate-llava-1.5-7b-bfloat16-cuda.md"
# 3. the CUDA tests (parity of every target with eager on the GPU, artifacts)
step gpu-tests 60 python3 -m pytest -q -x tests/gpu -p no:cacheprovider
cat "$summary"
