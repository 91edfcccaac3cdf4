#!/usr/bin/env bash
# Reliability on one GPU, in one call: the faults of bench.faults (a failed step, SIGKILL of
# a rank and of the engine core, a hung rank) against `serve_app:deploy` serving the
# Llama-2-7B shape (dummy bf16 weights), two offline LLMs in a row in one process (the
# first only deleted), then the CPU suite's serving fault tests on the GPU (tiny model).
#   bash bench/reliability_gpu.sh faults   # bench.faults + the offline lifetime (7B shape)
#   bash bench/reliability_gpu.sh tests    # the serving fault + lifetime tests (tiny model)
# Needs the carried wheels (.whl, see bench/serving_gpu.sh). JSON and logs go to $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
MODEL=/tmp/llama2-7b
python3 -c "import json, os; from bench.presets import PRESETS; os.makedirs('$MODEL', exist_ok=True); json.dump(PRESETS['llama2-7b'], open('$MODEL/config.json', 'w'))"
fail=0
part=${1:-faults}
if [ "$part" = faults ]; then
echo "=== bench.faults, Llama-2-7B shape"
python3 -m bench.faults --model "$MODEL" --offline-lifetime --max-tokens 3000 --hang-s 600 \
  --engine-arg load_format=dummy --engine-arg skip_tokenizer_init=true \
  --engine-arg max_model_len=4096 --engine-arg step_timeout_s=20 \
  --json-out "$OUT/faults_7b.json" > "$OUT/faults_7b.log" 2>&1 || fail=1
grep -E "^(offline|fail|kill|hang)" "$OUT/faults_7b.log"; [ $fail = 0 ] || tail -n 40 "$OUT/faults_7b.log"
else
echo "=== tests/reliability/test_serve_faults.py + tests/spmd/test_llm_lifetime.py on the GPU"
RELIABILITY_OUT=$OUT timeout 500 python3 -m pytest -q -p no:cacheprovider -p no:warnings \
  tests/reliability/test_serve_faults.py tests/spmd/test_llm_lifetime.py > "$OUT/pytest.log" 2>&1 || fail=1
tail -n 5 "$OUT/pytest.log"
fi
exit $fail
