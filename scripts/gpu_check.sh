#!/usr/bin/env bash
# GPU checks (run on a machine with an NVIDIA GPU; CI never runs this).
#  1. `make install` takes the normal sglang==0.5.23 install path (nvidia-smi present);
#  2. the sglang contract and page-hash golden tests pass against the full install;
#  3. SGLang itself serves the converted demo base model with --page-size 16 and answers.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi -L
make install
.venv/bin/python -m pytest -q tests/test_sglang_import.py tests/test_store_page_hash.py
BASE=$(.venv/bin/python -c "from sgl_scd.demo.base import ensure_base; print(ensure_base())")
mkdir -p out
PORT=${PORT:-30010}
.venv/bin/python -m sglang.launch_server --model-path "$BASE" --page-size 16 --port "$PORT" \
  --mem-fraction-static 0.3 > out/sglang_server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 2
done
curl -sf "http://127.0.0.1:$PORT/generate" -H 'Content-Type: application/json' \
  -d '{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}'
echo
echo "gpu_check: OK"
