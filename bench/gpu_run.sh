#!/usr/bin/env bash
# The GPU session in one script: every GPU lane and benchmark, each stage under its own time
# limit, results in bench/results/*-<device>.json and a summary, bench/results/gpu-session-
# <device>.json (device, torch/triton/transformers versions, commit, each stage's exit status
# and seconds). Plan: ~22 minutes of device time in two calls of the device tool (each call's
# command at most 10 minutes: the stages share SESSION_BUDGET_S, default 570 s), for a
# session's 30.
#
#   bash bench/gpu_session.sh --fetch-wheels     # HERE, before the session: wheels the device
#                                                # lacks (diffusers, importlib_metadata) -> .whl/
#   bash bench/gpu_session.sh --plan             # the stages and their time limits
#   bash bench/gpu_session.sh first              # ON THE DEVICE, call 1 (~9 min): setup tests
#                                                #   convergence kernels
#   bash bench/gpu_session.sh second             # call 2 (~9 min): setup trainer generation
#                                                #   device_map diffusion
#   bash bench/gpu_session.sh STAGE [STAGE ...]  # any stages, in the order given
#
# On the device: the tool copies the working tree (no .git), so pass the commit, and carry the
# wheels; $OUT then brings back one archive with the result files and every stage's log:
#   run(command="LINEAS_FAST_COMMIT=<sha> bash bench/gpu_session.sh first", carry=[".whl"])
# Unpack it here with `tar -xzf <files_at>/gpu-session.tar.gz` (bench/results/...) BEFORE the
# second call: the unpacked files travel with the tree, so the second call's summary adds its
# stages to the first call's and its archive holds both calls' results.
#
# A stage that fails or runs past its limit is recorded and the next one runs (the benchmarks
# write their result file after each model or shape group, so a stage cut short keeps what it
# measured); the script exits non-zero if any stage failed. Python: python3 where `python` is missing (the device's image).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0)

declare -A LIMIT=([setup]=40 [tests]=270 [convergence]=100 [kernels]=150 [trainer]=130
                  [generation]=240 [device_map]=70 [diffusion]=90)
BUDGET=${SESSION_BUDGET_S:-570}   # one call's command may run 600 s: stages share this, the
                                  # archive's few seconds come after
STAGES=(setup tests convergence kernels trainer generation device_map diffusion)
FIRST=(setup tests convergence kernels)
SECOND=(setup trainer generation device_map diffusion)

describe() {
  case $1 in
    setup) echo "install .whl/ wheels and lineas_fast (no registry there); GPU facts" ;;
    tests) echo "gpu lane: every kernel configuration x dtype vs float64 (tests/gpu, xdist" \
                "--dist loadfile), CUDA graphs, no-sync step, Triton-vs-torch training" ;;
    convergence) echo "bench/convergence.py: 30-step runs, Triton vs torch, Qwen2.5-0.5B shape, fp32+bf16" ;;
    kernels) echo "bench/kernels_gpu.py: loss and affine map vs eager and torch.compile, copy bandwidth" ;;
    trainer) echo "bench/trainer_step.py --qwen 1.5B 7B: lf.train step vs reference trainer, MFU" ;;
    generation) echo "bench/generation.py --qwen 1.5B 7B: decode/prefill per provider" ;;
    device_map) echo "bench/device_map.py: Qwen2.5-1.5B half offloaded to CPU vs whole on GPU" ;;
    diffusion) echo "bench/diffusion.py --sdxl: SDXL-sized UNet (needs the diffusers wheel)" ;;
  esac
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  echo /.whl/ >>"$(git rev-parse --git-dir)/info/exclude"
  mkdir -p .whl
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "${WHEELS[@]}"
fi
if [ "${1:-}" = "--plan" ]; then
  total=0
  for s in "${STAGES[@]}"; do
    printf '%-12s %4ss  %s\n' "$s" "${LIMIT[$s]}" "$(describe "$s")"; total=$((total + LIMIT[$s]))
  done
  echo "first: ${FIRST[*]}; second: ${SECOND[*]}; all limits together: ${total}s"
  exit 0
fi
if [ $# -eq 0 ]; then set -- "${STAGES[@]}"; fi
if [ "$1" = first ]; then set -- "${FIRST[@]}"; elif [ "$1" = second ]; then set -- "${SECOND[@]}"; fi
for s in "$@"; do
  [ -n "${LIMIT[$s]:-}" ] || { echo "unknown stage $s (${STAGES[*]}, first, second)"; exit 2; }
done

PY=$(command -v python || command -v python3)
mkdir -p /tmp/lf-bin && ln -sf "$PY" /tmp/lf-bin/python && export PATH=/tmp/lf-bin:$PATH
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# lineas_fast is installed into /tmp/lf-site (setup): without this, `python -m pytest` run here
# would put the working directory first on sys.path and import ./lineas_fast, which lacks
# lineas_fast.kernels (setup.py maps it from ./kernels)
export PYTHONSAFEPATH=1
export LINEAS_FAST_COMMIT=${LINEAS_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
[ -d /tmp/lf-site ] && export PYTHONPATH=/tmp/lf-site
LOGS=bench/results/gpu-session-logs
mkdir -p "$LOGS"
device=$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "no-cuda")')

setup() {
  rm -rf /tmp/lf-site && mkdir -p /tmp/lf-site
  if ls .whl/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/lf-site .whl/*.whl || return 1
  else
    echo "no .whl/ wheels carried: the diffusion stage will fail (bash bench/gpu_session.sh --fetch-wheels here)"
  fi
  python -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target /tmp/lf-site . || return 1
  export PYTHONPATH=/tmp/lf-site
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c 'import torch, triton, transformers, lineas_fast as lf; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "lineas_fast", lf.__version__, "SMs", torch.cuda.get_device_properties(0).multi_processor_count)'
}
tests() {
  local xdist=()
  python -c 'import xdist' 2>/dev/null && xdist=(-n 8 --dist loadfile)
  python -m pytest -q -p no:cacheprovider "${xdist[@]}" --junitxml "$LOGS/gpu-lane-$device.xml" tests/gpu
}
convergence() { python bench/convergence.py; }
kernels() { python bench/kernels_gpu.py --compile-at 56x3584 28x1536; }
trainer() { python bench/trainer_step.py --qwen 1.5B 7B; }
generation() { python bench/generation.py --qwen 1.5B 7B --repeats 3; }
device_map() { python bench/device_map.py --size 1.5B; }
diffusion() { python bench/diffusion.py --sdxl; }

status=0
results=()
start=$(date +%s)
for s in "$@"; do
  left=$(( BUDGET - ($(date +%s) - start) ))
  limit=$(( LIMIT[$s] < left ? LIMIT[$s] : left ))
  if [ "$limit" -lt 20 ]; then
    echo "=== stage $s: skipped, ${left}s left of the call's ${BUDGET}s"
    status=1; results+=("$s:skipped:0"); continue
  fi
  echo "=== stage $s (limit ${limit} s): $(describe "$s")"
  t0=$(date +%s)
  if [ "$s" = setup ]; then       # in this shell: it exports PYTHONPATH
    setup > >(tee "$LOGS/$s.log") 2>&1; rc=$?
  else
    export -f "$s"; export LOGS device
    timeout --kill-after=5 "$limit" bash -c "$s" > >(tee "$LOGS/$s.log") 2>&1; rc=$?
  fi
  secs=$(( $(date +%s) - t0 ))
  [ $rc -eq 124 ] && echo "stage $s: stopped at its ${limit} s limit"
  echo "=== stage $s: exit $rc in ${secs}s"
  [ $rc -ne 0 ] && status=1
  results+=("$s:$rc:$secs")
done

python - "$device" "${results[@]}" <<'EOF'
import json, os, sys
sys.path.insert(0, "bench")
from common import environment, write_json
device, rows = sys.argv[1], sys.argv[2:]
path = f"bench/results/gpu-session-{device}.json"
old = {}
if os.path.exists(path):
    with open(path) as f:
        old = json.load(f)
stages = old.get("stages", {})
for row in rows:
    name, rc, secs = row.split(":")
    stages[name] = {"exit": None if rc == "skipped" else int(rc), "seconds": int(secs),
                    "skipped": rc == "skipped"}
write_json(path, {**environment(), "stages": stages})
EOF
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu-session.tar.gz" bench/results/*"$device"*.json "$LOGS"
  echo "results: $OUT/gpu-session.tar.gz"
fi
exit $status
