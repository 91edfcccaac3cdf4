# Sourced by the GPU scripts (bench/gpu.sh, bench/serving_gpu.sh) on a lent device machine:
# installs the carried wheels (.whl: Ray, msgspec, ... are not on the GPU image), sets the
# environment every run shares, and makes $OUT.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
# NVLink multicast stays off: it can take a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
# SmolLM2's tokenizer (structured outputs) may travel xz-packed: .tok_xz/tok.tar.xz
# (0.5 MB, not 3.5: the carry limit is 64 MiB and the wheels take 60)
[ -d .tok_smollm2 ] || [ ! -f .tok_xz/tok.tar.xz ] || tar xJf .tok_xz/tok.tar.xz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

fail=0
run() {  # run NAME CMD...: logs to $OUT/NAME.log, keeps going on failure (fail=1)
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E '^\s*$|it/s\]|s/it\]' | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo "--- $name: rc=$rc, $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || { echo "!!! $name failed (rc=$rc)"; fail=1; }
}
