#!/usr/bin/env bash
# Multi-LoRA on one GPU (issue 11), one whole measurement per call on a lent device machine:
#
#   bash bench/lora_gpu.sh check    # LoRA op tests (Triton) + CUDA parity tests, kernel timings
#   bash bench/lora_gpu.sh engine   # 7B dummy, 512 prompts 256/256: base vs 1 vs 4 adapters (r=16)
#   bash bench/lora_gpu.sh peer     # the same prompts on transformers + PEFT (base, 1, 4 adapters)
#   bash bench/lora_gpu.sh serve    # HTTP with 4 adapters (model=<adapter>) vs offline, and base
#
# Needs the carried wheels (.whl, see bench/serving_gpu.sh). JSON and logs go to $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 -c 'import torch, triton, peft; print("torch", torch.__version__, "triton", triton.__version__, "peft", peft.__version__)'

thru() {  # thru NAME ARGS...: bench.throughput on the 7B shape with 4 random r=16 adapters
  local name=$1; shift
  run "$name" python3 -m bench.throughput --model llama2-7b --load-format dummy --device cuda \
    --input-len 256 --output-len 256 --max-num-seqs 512 --max-num-batched-tokens 8192 \
    --disable-detokenize --num-prompts 512 --lora-rank 16 --num-loras 4 \
    --json-out "$OUT/$name.json" "$@"
}

mode=${1:-check}
case $mode in
  check)
    run tests python3 -m pytest -q -x -p no:cacheprovider tests/workers/test_lora_ops.py \
      tests/workers/test_gpu_lora.py
    run kernels python3 -m bench.check_lora_kernels --json-out "$OUT/lora_kernels.json"
    ;;
  engine) thru lora_7b --backends dag ;;
  peer) thru lora_7b_peft --backends hf --hf-batch-size 128 ;;
  serve)
    MODEL=/tmp/llama2-7b
    python3 -c "import json, os; from bench.presets import PRESETS; os.makedirs('$MODEL', exist_ok=True); json.dump(PRESETS['llama2-7b'], open('$MODEL/config.json', 'w'))"
    run serve_lora python3 -m bench.serving --start-server "$MODEL" \
      --engine-arg load_format=dummy --engine-arg skip_tokenizer_init=true \
      --engine-arg max_num_seqs=512 --engine-arg max_num_batched_tokens=8192 \
      --serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1 --serve-env RAY_SERVE_ENABLE_HA_PROXY=1 \
      --lora-rank 16 --num-loras 4 --concurrency 256 --num-prompts 512 --input-len 256 \
      --output-len 256 --num-clients 4 --json-out "$OUT/serve_lora.json"
    ;;
  *) echo "unknown mode $mode (check | engine | peer | serve)"; exit 2 ;;
esac
exit $fail
