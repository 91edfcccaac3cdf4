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
  # The tokenizers' batch path on all cores, as users get it (gpu_env.sh turns it off for
  # the servers' forks); both sides tokenize with it.
  TOKENIZERS_PARALLELISM=true run "embed_$model" python3 -m bench.embed --random-bert "$model" --save-dir "/tmp/random-$model" \
    --device cuda --dtype bfloat16 --backends spmd,st --batch-sizes ${BATCH_SIZES:-16,32,64,128,256,512} \
    --num-sentences $n --min-tokens 8 --max-tokens 256 \
    --json-out "$OUT/embed_$model.json" --plot "$OUT/embed_$model.png"
  if [ "$model" = minilm ] && [ -z "${SKIP_SERVING:-}" ]; then
    for per in 1 16; do
      run "embed_serving_${model}_x$per" python3 -m bench.embed_serving --model "/tmp/random-$model" \
        --num-sentences 4096 --concurrency $((per == 1 ? 64 : 16)) --inputs-per-request $per \
        --engine-arg dtype=bfloat16 --json-out "$OUT/embed_serving_${model}_x$per.json"
    done
  fi
done
exit $fail
