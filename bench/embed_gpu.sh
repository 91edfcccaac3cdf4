#!/usr/bin/env bash
# Embeddings on one GPU (issue 12), one device call: LLM(task="embed").embed against
# sentence-transformers encode on the same mixed-length sentences (8..256 tokens), bf16,
# on random-weight BERTs of all-MiniLM-L6-v2's and bge-large's shapes (the GPU image has
# no checkpoints and no hub; bench/random_bert.py writes them):
#
#   bash bench/embed_gpu.sh              # both models
#   MODELS=minilm bash bench/embed_gpu.sh
#
# Needs the carried wheels (.whl, see bench/serving_gpu.sh). JSON, PNG and logs go to $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -c 'import torch, transformers, sentence_transformers as st; print("torch", torch.__version__, "transformers", transformers.__version__, "sentence-transformers", st.__version__)'

for model in ${MODELS:-minilm bge-large}; do
  case $model in
    minilm) n=8192 ;;
    bge-large) n=4096 ;;
    *) echo "unknown model $model (minilm | bge-large)"; exit 2 ;;
  esac
  run "embed_$model" python3 -m bench.embed --random-bert "$model" --save-dir "/tmp/random-$model" \
    --device cuda --dtype bfloat16 --backends spmd,st --batch-sizes 16,32,64,128,256,512 \
    --num-sentences $n --min-tokens 8 --max-tokens 256 \
    --json-out "$OUT/embed_$model.json" --plot "$OUT/embed_$model.png"
done
exit $fail
