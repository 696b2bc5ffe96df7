#!/usr/bin/env bash
# The prepared GPU run of issue "SCD on the GPU at real model sizes": for a machine that has only
# its own torch and transformers (no sglang, no registry, no weights; only this repo copied over).
# Runs in under 8 minutes on one H200 and leaves everything in one folder ($OUT, else out/gpu):
#   device.txt            nvidia-smi's view of the GPU
#   tests.log             the device codec tests on CUDA (unpack / pack / encode vs the CPU reference)
#   bench_gpu.jsonl/.png  scripts/bench_gpu.py: SmolLM2-135M, Llama-3.1-8B and Qwen2.5-7B shapes,
#                         1k-32k tokens, batch 1 and 8
#   bench_adapters.jsonl  the 8B shape at 8k tokens: 1, 2, 4 and 8 adapters decoding one code set
#   bench_gpu.log         the tables as they were printed
# Usage: SCD_GIT_SHA=$(git rev-parse --short=12 HEAD) bash scripts/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi > "$OUT/device.txt" 2>&1 || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_codec_device.py > "$OUT/tests.log" 2>&1 || echo "device tests FAILED (see tests.log)"
timeout 300 "$PY" scripts/bench_gpu.py --budget-s 240 --json "$OUT/bench_gpu.jsonl" --plot "$OUT/bench_gpu.png" \
  2>&1 | tee "$OUT/bench_gpu.log" || echo "bench_gpu stopped early: $?"
timeout 80 "$PY" scripts/bench_gpu.py --shapes llama-3.1-8b --tokens 8192 --batch 1 --adapters 1,2,4,8 --repeats 2 \
  --json "$OUT/bench_adapters.jsonl" --plot "$OUT/bench_adapters.png" 2>&1 | tee -a "$OUT/bench_gpu.log" || echo "adapters run stopped early: $?"
