#!/usr/bin/env bash
# Embeddings on one GPU (issue 12), one device call: the Triton varlen kernel's CUDA tests
# and check (bench/check_varlen_kernels.py), then LLM(task="embed").embed against
# sentence-transformers encode on the same mixed-length sentences (8..256 tokens), bf16,
# on random-weight BERTs of all-MiniLM-L6-v2's and bge-large's shapes (the GPU image has
# no checkpoints and no hub; bench/random_bert.py writes them), then the MiniLM shape
# through the server (bench/embed_serving.py, HTTP vs offline LLM.embed):
#
#   bash bench/embed_gpu.sh              # both models
#   MODELS=minilm bash bench/embed_gpu.sh
#   SKIP_CHECKS=1 PROFILE=1 BATCH_SIZES=64,256 MODELS=minilm bash bench/embed_gpu.sh
#   SKIP_CHECKS=1 SKIP_EMBED=1 MODELS=minilm PY_SPY=1 SERVING_MODES=fast bash bench/embed_gpu.sh
#
# Needs the carried wheels (.whl, see bench/serving_gpu.sh; the openai client there needs
# truststore too). JSON, PNG and logs go to $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -c 'import torch, transformers, sentence_transformers as st; print("torch", torch.__version__, "transformers", transformers.__version__, "sentence-transformers", st.__version__)'

if [ -z "${SKIP_CHECKS:-}" ]; then
  run varlen_tests python3 -m pytest -q --noconftest -p no:cacheprovider tests/workers/test_triton_varlen.py
  run varlen_check python3 -m bench.check_varlen_kernels
fi

if [ -n "${PROFILE:-}" ]; then  # where LLM.embed's time goes (bench/profile_embed.py)
  TOKENIZERS_PARALLELISM=true run profile_embed python3 -m bench.profile_embed --random-bert minilm --save-dir /tmp/random-minilm \
    --device cuda --dtype bfloat16 --num-sentences 8192 --batch-size 256 \
    --json-out "$OUT/profile_embed.json"
fi

for model in ${MODELS:-minilm bge-large}; do
  case $model in
    minilm) n=8192 ;;
    bge-large) n=4096 ;;
    *) echo "unknown model $model (minilm | bge-large)"; exit 2 ;;
  esac
  if [ -z "${SKIP_EMBED:-}" ]; then
    # The tokenizers' batch path on all cores, as users get it (gpu_env.sh turns it off for
    # the servers' forks); both sides tokenize with it.
    TOKENIZERS_PARALLELISM=true run "embed_$model" python3 -m bench.embed --random-bert "$model" --save-dir "/tmp/random-$model" \
      --device cuda --dtype bfloat16 --backends spmd,st --batch-sizes ${BATCH_SIZES:-16,32,64,128,256,512} \
      --num-sentences $n --min-tokens 8 --max-tokens 256 \
      --json-out "$OUT/embed_$model.json" --plot "$OUT/embed_$model.png"
  else
    python3 -c "from bench.random_bert import build_random_bert; build_random_bert('$model', '/tmp/random-$model')"
  fi
  if [ "$model" = minilm ] && [ -z "${SKIP_SERVING:-}" ]; then
    # Through the server, each ingress (fast: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 + HAProxy;
    # proxy: Serve's default Python proxy), from 4 client processes; PY_SPY=1 samples the
    # proxy, replica, engine core and rank during the timed run.
    for mode in ${SERVING_MODES:-fast proxy}; do
      case $mode in
        fast) ingress=(--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1 --serve-env RAY_SERVE_ENABLE_HA_PROXY=1) ;;
        proxy) ingress=() ;;
        *) echo "unknown serving mode $mode (fast | proxy)"; exit 2 ;;
      esac
      for per in ${INPUTS_PER_REQUEST:-1 16}; do
        name="embed_serving_${model}_${mode}_x$per"
        spy=(); [ -n "${PY_SPY:-}" ] && spy=(--py-spy "$OUT/spy_$name")
        run "$name" python3 -m bench.embed_serving --model "/tmp/random-$model" \
          --num-sentences 4096 --concurrency $((per == 1 ? 64 : 16)) --inputs-per-request $per \
          --num-clients ${NUM_CLIENTS:-4} "${ingress[@]}" "${spy[@]}" \
          --engine-arg dtype=bfloat16 --json-out "$OUT/$name.json"
        # one archive: the device returns a limited number of files
        [ -d "$OUT/spy_$name" ] && tar czf "$OUT/spy_$name.tgz" -C "$OUT" "spy_$name" && rm -rf "$OUT/spy_$name"
      done
    done
  fi
done
exit $fail
