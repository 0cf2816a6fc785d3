#!/usr/bin/env bash
# Before/after over HTTP on one GPU: the same 32 concurrent users x (512 -> 256 tokens) against
# flatout serving one request at a time (--max-num-seqs 1: what a server without batching does)
# and against flatout as it ships; then `flatout bench --compare`.
#     bash benchmarks/bench_serve_compare.sh OUT_DIR [MODEL]
set -euo pipefail
out=${1:?output folder}; model=${2:-glm-4-9b}; port=8011
prompts=${NUM_PROMPTS:-64}; input_len=${INPUT_LEN:-512}; output_len=${OUTPUT_LEN:-256}
mkdir -p "$out"
flatout() { python3 -m flatout.cli "$@"; }

serve_and_bench() {  # label, extra serve flags...
  local label=$1; shift
  python3 -m flatout.cli serve --model "$model" --load-format dummy --port $port "$@" \
    > "$out/serve_$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 180); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 $pid 2>/dev/null || { cat "$out/serve_$label.log"; exit 1; }
    sleep 1
  done
  flatout bench --base-url "http://127.0.0.1:$port" --concurrency 32 --input-len $input_len \
    --output-len $output_len --num-prompts $prompts --no-progress --json "$out/$label.json" \
    > "$out/bench_$label.txt" 2>&1
  kill -TERM $pid; wait $pid || true
}

serve_and_bench one_at_a_time --max-num-seqs 1 --max-waiting-requests 1024
serve_and_bench flatout
flatout bench --compare "$out/one_at_a_time.json" "$out/flatout.json" \
  --labels "one request at a time" "flatout" --markdown | tee "$out/compare.md"
