#!/usr/bin/env bash
# GPU benchmark runner: the GPU test lane and every GPU benchmark as stages, each under its own
# time limit, all of them under one time budget. Run it on a GPU machine from the repository root
# (or anywhere: it changes to the root itself).
#
#   bash bench/gpu_run.sh [OPTION ...] [STAGE | GROUP ...]     (default: every stage, in order)
#
# Stages, in order, with their default limits (seconds):
#   setup (40)        install this checkout (and any .whl/*.whl) into a temporary folder that
#                     the later stages import from (removed on exit); GPU facts. Leave it out to
#                     measure the lineas_fast already installed in $PYTHON's environment.
#   tests (270)       tests/gpu (pytest, xdist when installed)
#   convergence (100) bench/convergence.py          kernels (150)     bench/kernels_gpu.py
#   trainer (130)     bench/trainer_step.py         generation (240)  bench/generation.py
#   device_map (70)   bench/device_map.py           diffusion (90)    bench/diffusion.py --sdxl
# Groups: kernel-stages = setup tests convergence kernels (560 s of limits);
#         model-stages  = setup trainer generation device_map diffusion distributed (690 s of limits).
#
# Options:
#   --budget-s N      seconds for all stages together (default: the sum of their limits, so none
#                     is cut). Each stage gets the smaller of its limit and what is left of the
#                     budget; with under 20 s left it is skipped (and recorded as skipped).
#   --limit STAGE=S   one stage's limit in seconds (repeatable).
#   --archive PATH    also write PATH, a .tar.gz of this device's result files and the logs.
#   --plan            print the stages with the limits they would get and their total; run nothing.
#   --fetch-wheels    (on a machine with a package index) download the wheels a GPU machine without
#                     one needs for the diffusion stage (diffusers, importlib_metadata) into .whl/.
# Environment: PYTHON, the interpreter every stage runs (default: `python`, else `python3`; a
# virtualenv's or conda environment's python is used as it is, never copied or linked);
# LINEAS_FAST_COMMIT, the commit the results belong to when the tree is a copy without .git.
#
# Results: bench/results/<benchmark>-<device>.json (each benchmark writes its file after each model
# or shape group, so a stage cut short keeps what it measured) and the run's summary,
# bench/results/gpu-run-<device>.json: device, torch / triton / transformers versions, commit, the
# python that ran and its sys.prefix, each stage's exit status and seconds (a later run on the same
# device adds its stages to it). Logs: bench/results/gpu-run-logs/<stage>.log. A stage that fails or
# runs past its limit is recorded and the next one runs; the exit status is 1 if any stage failed
# or was skipped, 2 for a bad argument. Writes nothing outside the repository but the temporary
# folder of the setup stage. Python >= 3.11: PYTHONSAFEPATH keeps ./lineas_fast off sys.path, so the
# stages import the installed package (lineas_fast.kernels is mapped from ./kernels at install).
set -u
usage() { sed -n '2,/^set -u$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
MIN_STAGE_S=20
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0)
STAGES=(setup tests convergence kernels trainer generation device_map diffusion distributed)
declare -A LIMIT=([setup]=40 [tests]=270 [convergence]=100 [kernels]=150 [trainer]=130
                  [generation]=240 [device_map]=70 [diffusion]=90 [distributed]=120)
declare -A GROUP=([kernel-stages]="setup tests convergence kernels"
                  [model-stages]="setup trainer generation device_map diffusion distributed")

describe() {
  case $1 in
    setup) echo "install this checkout (and .whl/ wheels) into a temporary folder; GPU facts" ;;
    tests) echo "gpu lane: every kernel configuration x dtype vs float64, CUDA graphs, training" ;;
    convergence) echo "bench/convergence.py: 30-step runs, Triton vs torch, fp32 and bf16" ;;
    kernels) echo "bench/kernels_gpu.py: loss and affine map vs eager and torch.compile, copy bandwidth" ;;
    trainer) echo "bench/trainer_step.py --qwen 1.5B 7B: lf.train step vs reference trainer, MFU" ;;
    generation) echo "bench/generation.py --qwen 1.5B 7B: decode/prefill per provider" ;;
    device_map) echo "bench/device_map.py: Qwen2.5-1.5B half offloaded to CPU vs whole on GPU" ;;
    diffusion) echo "bench/diffusion.py --sdxl: SDXL-sized UNet (needs diffusers)" ;;
    distributed) echo "bench/distributed.py: data-parallel steps over 1, 2, 4, 8 GPUs present (NCCL)" ;;
  esac
}
bad() { echo "gpu_run.sh: $*" >&2; exit 2; }

BUDGET="" ARCHIVE="" PLAN=0 FETCH=0 names=()
while [ $# -gt 0 ]; do
  case $1 in
    --budget-s) [[ ${2:-} =~ ^[0-9]+$ ]] || bad "--budget-s needs whole seconds, got '${2:-}'"
                BUDGET=$2; shift ;;
    --limit) [[ ${2:-} =~ ^([a-z_]+)=([0-9]+)$ ]] || bad "--limit needs STAGE=SECONDS, got '${2:-}'"
             [ -n "${LIMIT[${BASH_REMATCH[1]}]:-}" ] || bad "--limit: unknown stage ${BASH_REMATCH[1]} (${STAGES[*]})"
             LIMIT[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; shift ;;
    --archive) [ -n "${2:-}" ] || bad "--archive needs a path"
               case $2 in /*) ARCHIVE=$2 ;; *) ARCHIVE=$PWD/$2 ;; esac; shift ;;
    --plan) PLAN=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) bad "unknown option $1 (see --help)" ;;
    *) if [ -n "${GROUP[$1]:-}" ]; then read -ra g <<<"${GROUP[$1]}"; names+=("${g[@]}")
       elif [ -n "${LIMIT[$1]:-}" ]; then names+=("$1")
       else bad "unknown stage $1 (stages: ${STAGES[*]}; groups: ${!GROUP[*]})"; fi ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
[ ${#names[@]} -eq 0 ] && names=("${STAGES[@]}")

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
PY=$("$PYTHON" -c 'import sys; print(sys.executable)') || bad "PYTHON=$PYTHON does not run"
export PY

if [ $FETCH = 1 ]; then   # pure-Python wheels: any interpreter version and platform can use them
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
fi

if [ -z "$BUDGET" ]; then BUDGET=0; for s in "${names[@]}"; do BUDGET=$((BUDGET + LIMIT[$s])); done; fi

# planned[i]: the limit stage i gets when every stage before it runs to its limit (0: skipped)
planned=() left=$BUDGET
for s in "${names[@]}"; do
  lim=$(( LIMIT[$s] < left ? LIMIT[$s] : left ))
  if [ "$lim" -lt $MIN_STAGE_S ]; then planned+=(0); else planned+=("$lim"); left=$((left - lim)); fi
done
if [ $PLAN = 1 ]; then
  for i in "${!names[@]}"; do
    s=${names[$i]} p=${planned[$i]}
    if [ "$p" = 0 ]; then printf '%-12s skipped  %s (budget spent)\n' "$s" "$(describe "$s")"
    else printf '%-12s %5s s  %s%s\n' "$s" "$p" "$(describe "$s")" \
      "$([ "$p" -lt "${LIMIT[$s]}" ] && echo " (cut from ${LIMIT[$s]} s by the budget)")"; fi
  done
  echo "total $((BUDGET - left)) s of limits within a budget of $BUDGET s; python: $PY"
  exit 0
fi

export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONSAFEPATH=1
# compiler caches under the project's cache folder (not the temporary directory), as tests/run.sh
cache=${LINEAS_FAST_CACHE:-$HOME/.cache/lineas_fast}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$cache/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$cache/torchinductor}
export LINEAS_FAST_COMMIT=${LINEAS_FAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LOGS=bench/results/gpu-run-logs
mkdir -p "$LOGS"
device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "no-cuda")') \
  || { echo "gpu_run.sh: $PY cannot import torch: install torch into that environment first" >&2; exit 1; }
SITE=""
trap 'if [ -n "$SITE" ]; then rm -rf "$SITE"; fi' EXIT

setup() {     # runs in this shell: later stages inherit PYTHONPATH
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/lineas-fast-gpu-run.XXXXXX")
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
      || return 1
  else
    echo "no .whl/ wheels: the diffusion stage needs diffusers (bash bench/gpu_run.sh --fetch-wheels)"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target "$SITE" . || return 1
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c 'import sys, torch, triton, transformers, lineas_fast as lf; print("python", sys.executable, "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "lineas_fast", lf.__version__, "from", lf.__file__, "SMs", torch.cuda.get_device_properties(0).multi_processor_count)'
}
tests() {
  local xdist=()
  "$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 8 --dist loadfile)
  "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" --junitxml "$LOGS/gpu-lane-$device.xml" tests/gpu
}
convergence() { "$PY" bench/convergence.py; }
kernels() { "$PY" bench/kernels_gpu.py --compile-at 56x3584 28x1536; }
trainer() { "$PY" bench/trainer_step.py --qwen 1.5B 7B; }
generation() { "$PY" bench/generation.py --qwen 1.5B 7B --repeats 3; }
device_map() { "$PY" bench/device_map.py --size 1.5B; }
diffusion() { "$PY" bench/diffusion.py --sdxl; }
distributed() {   # 1, 2, 4, 8 processes, as many as there are GPUs
  local n procs=()
  n=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || return 1
  for k in 1 2 4 8; do [ "$k" -le "$n" ] && procs+=("$k"); done
  [ ${#procs[@]} -gt 0 ] || { echo "no CUDA device"; return 1; }
  "$PY" bench/distributed.py --procs "${procs[@]}"
}

status=0
results=()
start=$(date +%s)
for s in "${names[@]}"; do
  left=$(( BUDGET - ($(date +%s) - start) ))
  limit=$(( LIMIT[$s] < left ? LIMIT[$s] : left ))
  if [ "$limit" -lt $MIN_STAGE_S ]; then
    echo "=== stage $s: skipped, ${left}s left of the ${BUDGET}s budget"
    status=1; results+=("$s:skipped:0"); continue
  fi
  echo "=== stage $s (limit ${limit} s): $(describe "$s")"
  t0=$(date +%s)
  if [ "$s" = setup ]; then
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

"$PY" - "$device" "$BUDGET" "${results[@]}" <<'EOF'
import json, os, sys
sys.path.insert(0, "bench")
from common import environment, write_json
device, budget, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
path = f"bench/results/gpu-run-{device}.json"
old = {}
if os.path.exists(path):
    with open(path) as f:
        old = json.load(f)
stages = old.get("stages", {})
for row in rows:
    name, rc, secs = row.split(":")
    stages[name] = {"exit": None if rc == "skipped" else int(rc), "seconds": int(secs),
                    "skipped": rc == "skipped"}
write_json(path, {**environment(), "python_executable": sys.executable, "python_prefix": sys.prefix,
                  "budget_s": budget, "stages": stages})
EOF
if [ -n "$ARCHIVE" ]; then
  mkdir -p "$(dirname "$ARCHIVE")"
  tar -czf "$ARCHIVE" bench/results/*"$device"*.json "$LOGS" && echo "results: $ARCHIVE"
fi
exit $status
