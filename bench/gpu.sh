#!/usr/bin/env bash
# One whole GPU measurement per call on a lent device machine (see README, Benchmarks).
#
#   bash bench/gpu.sh smoke   # kernels (and varlen attention) vs float64, fp32 tiny parity, short 7B
#   bash bench/gpu.sh tp1     # nvidia-h100-x1: fp32 parity; 7B dummy 512 prompts, dag/inproc/ray/hf
#   bash bench/gpu.sh tp1b    # nvidia-h100-x1: 7B dummy 1000 prompts (dag), profile
#   bash bench/gpu.sh tp2     # nvidia-h200-x2 (issue 16): 7B 512 and 1000 prompts dag/ray at
#                             # tp=2, FP8 KV dag, and the counted floors (bench.roofline)
#   bash bench/gpu.sh tp4     # nvidia-h200-x4: the same at tp=4 (target >= 34,000 total tok/s)
#   bash bench/gpu.sh tp4_70b # nvidia-h200-x4: Llama-2-70B shape at tp=4, 512 x 256/256, dag,
#                             # against its counted floor
#   TPS=1,2,4 bash bench/gpu.sh tpcheck   # fp32 tiny parity at each tp (CUDA graphs on and
#                             # off), bf16 7B prefill logits at each tp vs tp=1, vs fp32 and vs
#                             # transformers' own bf16 drift on the same weights
#   bash bench/gpu.sh engine  # issue 13: 7B 512 prompts dag, dag-sync (no overlap), inproc, hf;
#                             # 20 decode steps traced (device gaps); then kv_reserve=1
#   MODEL=llama3-8b ENGINE_ARGS="kv_cache_dtype=fp8" bash bench/gpu.sh engine
#   bash bench/gpu.sh floor   # issue 13 in one call: 7B bf16 dag/inproc/hf, tiny fp32 parity,
#                             # 7B fp8 dag, decode-kernel sweep, 7B kv_reserve=1, Llama-3-8B dag/inproc
#   bash bench/gpu.sh overlap # issue 13: overlapped rank steps: fp32 tiny parity (graphs and
#                             # eager), then 7B bf16 dag with them on and off, inproc, hf, each
#                             # with 20 decode steps traced (device gaps) (~6 min)
#   bash bench/gpu.sh floor2  # the same runs' throughput rows alone: 7B bf16 dag/inproc/hf,
#                             # 7B fp8 dag, Llama-3-8B dag/inproc, and one mixed step (480
#                             # decodes + 30 prompts) profiled per op (~7 min, fits one call)
#   bash bench/gpu.sh structured  # issue 14: 7B shape (SmolLM2's vocabulary) unconstrained vs
#                             # every request under bench.throughput's JSON schema; needs
#                             # .tok_smollm2 (SmolLM2's tokenizer saved by save_pretrained) and
#                             # wheels with xgrammar: EXTRA="pyzmq xgrammar==0.2.9 apache-tvm-ffi"
#   bash bench/gpu.sh moe     # issue 15: spmd::fused_moe checked and timed (check_kernels
#                             # --only-moe); Qwen3-30B-A3B 512 x 256/256 dag vs transformers
#                             # (~8 min: transformers alone takes 5)
#   bash bench/gpu.sh moe_profile  # issue 15: a Qwen3-30B-A3B decode step at batch 512, per op
#   bash bench/gpu.sh nano    # issue 15: Qwen3-0.6B on nano-vllm's workload (256 seqs,
#                             # 100..1024 in and out) dag vs transformers
#   bash bench/gpu.sh fp8acc  # FP8 KV accuracy on the real SmolLM2 (bench/fp8_accuracy.py);
#                             # the GGUF (98 MB) travels in parts .gguf_a/b/c (carry limit)
#
# Needs the carried wheels (.whl, from ../shared/device/make-wheels.sh): Ray and msgspec
# are not on the GPU image. JSON lines and logs go to $OUT (or ./gpu-out).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

thru() {  # thru NAME ARGS...: bench.throughput on the 7B shape, JSON to $OUT/NAME.json
  local name=$1; shift
  run "$name" python3 -m bench.throughput --model llama2-7b --load-format dummy --device cuda \
    --input-len 256 --output-len 256 --max-num-seqs 512 --max-num-batched-tokens 8192 \
    --disable-detokenize --json-out "$OUT/$name.json" "$@"
}

mode=${1:-smoke}
case $mode in
  smoke)
    run kernels python3 -m bench.check_kernels
    run varlen_kernels python3 -m bench.check_varlen_kernels --json-out "$OUT/varlen_kernels.json"
    run parity python3 -m bench.gpu_check --tiny --tp 1
    thru smoke --num-prompts 128 --backends dag
    ;;
  tp1)
    thru tp1_512 --num-prompts 512 --backends dag,ray,inproc,hf --hf-batch-size 128
    ;;
  tp1b)
    thru tp1_1000 --num-prompts 1000 --backends dag
    run profile python3 -m bench.profile --device cuda --model llama2-7b --load-format dummy \
      --batch-size 256 --input-len 256 --steps 5 --trace "$OUT/trace_tp1.json"
    ;;
  tp2|tp4)
    tp=${mode#tp}
    for n in 512 1000; do
      run "roofline_tp${tp}_$n" python3 -m bench.roofline --model llama2-7b --tp "$tp" \
        --num-prompts "$n" --json-out "$OUT/roofline_tp${tp}_$n.json"
      thru "tp${tp}_$n" --num-prompts "$n" --tp "$tp" --backends dag,ray
    done
    # If capturing NCCL inside CUDA graphs fails here, still measure the eager path.
    [ -s "$OUT/tp${tp}_512.json" ] || thru "tp${tp}_512_eager" --num-prompts 512 --tp "$tp" \
      --backends dag --enforce-eager
    thru "tp${tp}_512_fp8" --num-prompts 512 --tp "$tp" --backends dag --engine-arg kv_cache_dtype=fp8
    ;;
  tp4_70b)
    run roofline_70b python3 -m bench.roofline --model llama2-70b --tp 4 --num-prompts 512 \
      --json-out "$OUT/roofline_70b.json"
    run roofline_70b_fp8 python3 -m bench.roofline --model llama2-70b --tp 4 --num-prompts 512 \
      --kv-cache-dtype fp8 --json-out "$OUT/roofline_70b_fp8.json"
    thru tp4_70b --model llama2-70b --num-prompts 512 --tp 4 --backends dag
    ;;
  tpcheck)
    run parity python3 -m bench.gpu_check --tiny --eager-too --tp "${TPS:-1,2}" \
      --json-out "$OUT/gpu_check_tiny.json"
    run logits python3 -m bench.gpu_check --logits --tp "${TPS:-1,2}" --json-out "$OUT/gpu_check_logits.json"
    ;;
  engine)
    model=${MODEL:-llama2-7b}
    extra=(); for a in ${ENGINE_ARGS:-}; do extra+=(--engine-arg "$a"); done
    tag=${model}${ENGINE_ARGS:+_${ENGINE_ARGS// /_}}; tag=${tag//=/}
    thru "engine_$tag" --model "$model" --num-prompts 512 --backends ${BACKENDS:-dag,dag-sync,inproc,hf} \
      --hf-batch-size 128 --profile-steps 150,20 --profile-dir "$OUT/prof_$tag" "${extra[@]}"
    [ "${RESERVE:-1}" != 0 ] && thru "engine_${tag}_reserve" --model "$model" --num-prompts 512 \
      --backends dag --engine-arg kv_reserve=1 "${extra[@]}"
    # one archive: the device returns a limited number of files
    [ -d "$OUT/prof_$tag" ] && tar czf "$OUT/prof_$tag.tgz" -C "$OUT" "prof_$tag" && rm -rf "$OUT/prof_$tag"
    ;;
  floor)
    thru floor_7b_bf16 --num-prompts 512 --backends dag,inproc,hf --hf-batch-size 128
    thru floor_7b_fp8 --num-prompts 512 --backends dag --engine-arg kv_cache_dtype=fp8
    run parity python3 -m bench.gpu_check --tiny --tp 1
    [ "${SWEEP:-1}" != 0 ] && run sweep python3 -m bench.sweep_decode \
      --json-out "$OUT/sweep_decode.jsonl" --block-n 32,64 --warps 1,4 --stages 2 \
      --partitions 256,1024 --budget-s 90
    thru floor_7b_bf16_reserve --num-prompts 512 --backends dag --engine-arg kv_reserve=1
    thru floor_8b_bf16 --model llama3-8b --num-prompts 512 --backends dag,inproc
    ;;
  overlap)  # overlapped rank steps on the device: parity first, then on/off side by side
    run parity python3 -m bench.gpu_check --tiny --tp 1 --eager-too
    thru overlap_7b --num-prompts 512 --backends dag,dag-nooverlap,inproc,hf --hf-batch-size 128 \
      --profile-steps 200,20
    ;;
  floor2)  # the floor's throughput rows alone (~7 min): 7B bf16 dag/inproc/hf, one mixed
           # step per op, 7B fp8 dag, Llama-3-8B dag/inproc
    thru floor_7b_bf16 --num-prompts 512 --backends dag,inproc,hf --hf-batch-size 128
    # a mixed step as the run has them: 480 decoding (~260 tokens of context) + 30 prompts of 256
    run mixed_profile python3 -m bench.profile --device cuda --model llama2-7b --load-format dummy \
      --batch-size 480 --input-len 256 --phase mixed --mixed-prompts 30 --steps 1 \
      --warmup-steps 2 --max-num-batched-tokens 8192 --trace /tmp/mixed_trace.json --top 30
    thru floor_7b_fp8 --num-prompts 512 --backends dag --engine-arg kv_cache_dtype=fp8
    thru floor_8b_bf16 --model llama3-8b --num-prompts 512 --backends dag,inproc
    ;;
  structured)
    thru structured_7b --num-prompts 512 --backends dag --structured json --tokenizer .tok_smollm2
    ;;
  moe)
    run kernels_moe python3 -m bench.check_kernels --only-moe
    thru qwen3_30b_a3b --model qwen3-30b-a3b --num-prompts 512 --backends dag,hf --hf-batch-size 512
    ;;
  moe_profile)  # where a Qwen3-30B-A3B decode step's 38 ms go (counted 17-23 ms), per op
    run moe_decode_profile python3 -m bench.profile --device cuda --model qwen3-30b-a3b \
      --load-format dummy --batch-size 512 --input-len 256 --steps 3 \
      --max-num-batched-tokens 16384 --trace /tmp/moe_trace.json --top 30
    ;;
  nano)
    thru qwen3_06b_nano --model qwen3-0.6b --nano-vllm --num-prompts 256 --backends dag,hf \
      --hf-batch-size 256 --max-model-len 4096 --max-num-batched-tokens 16384
    # where a decode step of that run goes (batch 256, ~800 tokens of context), per op
    run nano_profile python3 -m bench.profile --device cuda --model qwen3-0.6b --load-format dummy \
      --batch-size 256 --input-len 768 --steps 3 --trace /tmp/nano_trace.json --top 25
    ;;
  kernels)
    run kernels python3 -m bench.check_kernels --dtypes bfloat16 --skip-bandwidth
    ;;
  fp8acc)
    cat .gguf_a/part .gguf_b/part .gguf_c/part > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
    run fp8_accuracy python3 -m bench.fp8_accuracy --model /tmp/SmolLM2-135M-Instruct.Q4_1.gguf \
      --device cuda --dtype bfloat16 --num-prompts 64 --max-tokens 64 --json-out "$OUT/fp8_accuracy.json"
    ;;
  *) echo "unknown mode $mode (smoke | tp1 | tp1b | tp2 | tp4 | tp4_70b | tpcheck | engine | floor | overlap | floor2 | structured | moe | moe_profile | nano | kernels | fp8acc)"; exit 2 ;;
esac
exit $fail
