#!/usr/bin/env bash
# GPU benchmark runner: the GPU test lane and every GPU benchmark as stages, each under its own
# time limit, all of them under one time budget. Run it on a GPU machine from the repository root
# (or anywhere: it changes to the root itself).
#
#   bash bench/gpu_run.sh [OPTION ...] [STAGE | GROUP ...]     (default: the group all)
#
# One GPU session of 10 minutes, everything in one command (docs/benchmarks.md#on-a-gpu):
#   LINEAS_FAST_COMMIT=<sha> bash bench/gpu_run.sh --budget-s 540 --archive DIR/gpu-run.tar.gz session
#
# Stages, with their default limits (seconds):
#   setup (40)          install this checkout (and any .whl/*.whl) offline into a temporary folder
#                       that the later stages import from (removed on exit); versions. Leave it out
#                       to measure the lineas_fast already installed in $PYTHON's environment.
#   tests (270)         tests/gpu, the whole gpu lane (pytest; one xdist worker per file)
#   tests-core (90)     its quick part: CUDA-graph capture of a steered decode step and of the
#                       per-request lookup and map; every kernel at paper-like shapes, fp32/bf16/fp16
#   tests-sweep (180)   its exhaustive part: every kernel configuration x dtype vs float64
#   convergence (100)   bench/convergence.py                   kernels (150)  bench/kernels_gpu.py
#   trainer (130)       bench/trainer_step.py --qwen 1.5B 7B   trainer-1.5b (60): --qwen 1.5B
#   generation (240)    bench/generation.py --qwen 1.5B 7B     decode-1.5b (80): 1.5B, unsteered,
#                                                              folded, fused norms, batch 1 and 16
#   device_map (70)     bench/device_map.py     diffusion (90)  bench/diffusion.py --sdxl
#   distributed (120)   bench/distributed.py over the GPUs present
# Groups: all = setup tests convergence kernels trainer generation device_map diffusion distributed
#         kernel-stages = setup tests convergence kernels (560 s of limits)
#         model-stages  = setup trainer generation device_map diffusion distributed (690 s)
#         session = setup tests-core tests-sweep kernels trainer-1.5b decode-1.5b under the
#           session's own limits (30 90 150 110 60 80: 520 s), then the spare stages convergence
#           device_map distributed diffusion, which run only in time the others leave unused;
#           budget 540 s unless --budget-s says otherwise. --plan session shows it.
#
# Options:
#   --budget-s N      seconds for the whole run, from its start (default: the sum of the stages'
#                     limits, counted from the first stage, so none is cut; 540 for session). Each
#                     stage gets the smaller of its limit and what is left of the budget; with under
#                     20 s left (60 for convergence, 45 for device_map) it is skipped and recorded
#                     as skipped.
#   --limit STAGE=S   one stage's limit in seconds (repeatable; wins over a group's limits).
#   --archive PATH    a .tar.gz of this device's result files, the run's summary and the logs,
#                     rewritten after every stage: a run stopped from outside still leaves one
#                     holding every stage finished before it.
#   --plan            print the stages with the limits they would get and their total; run nothing.
#   --dry-run         run every chosen stage in check mode, on any machine (no GPU needed): setup
#                     installs the checkout offline as on a GPU machine, the test stages collect
#                     their tests (the gpu lane's CPU rehearsal), each benchmark runs its script with
#                     its real arguments and --check-args. Writes nothing under bench/results.
#   --fetch-wheels    (on a machine with a package index) download the wheels a GPU machine without
#                     one needs for the diffusion stage (diffusers, importlib_metadata) into .whl/.
# Environment: PYTHON, the interpreter every stage runs (default: `python` if it imports torch,
# else `python3`; a virtualenv's or conda environment's python is used as it is, never copied or
# linked); LINEAS_FAST_COMMIT, the commit the results belong to when the tree is a copy without .git.
#
# Results: bench/results/<benchmark>-<device>.json (each benchmark writes its file after each model,
# provider or shape group, so a stage cut short keeps what it measured) and the run's summary,
# bench/results/gpu-run-<device>.json (bench/gpu_run_summary.py): device, GPU facts, torch / triton
# / transformers versions, commit, the python that ran and its sys.prefix, the plan, each stage's
# exit status, seconds and limit, rewritten after each stage ("finished": false until the end; a
# later run on the same device adds its stages to it). Logs: bench/results/gpu-run-logs/<stage>.log,
# the test stages' junit XML beside them. A stage that fails, runs past its limit (exit 124) or
# cannot run here (exit 69: a package or the GPUs it needs are missing; recorded as skipped with the
# reason) is recorded and the next one runs. Exit status: 0 when every stage passed (a spare stage
# may be skipped or not runnable), 1 otherwise, 2 for a bad argument. Writes nothing outside the
# repository but the temporary folder of the setup stage and the archive. Python >= 3.11:
# PYTHONSAFEPATH keeps ./lineas_fast off sys.path, so the stages import the installed package
# (lineas_fast.kernels is mapped from ./kernels at install).
set -u
usage() { sed -n '2,/^set -u$/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
MIN_STAGE_S=20
NOT_RUNNABLE=69
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0)
STAGES=(setup tests convergence kernels trainer generation device_map diffusion distributed)
declare -A LIMIT=([setup]=40 [tests]=270 [tests-core]=90 [tests-sweep]=180 [convergence]=100
                  [kernels]=150 [trainer]=130 [trainer-1.5b]=60 [generation]=240 [decode-1.5b]=80
                  [device_map]=70 [diffusion]=90 [distributed]=120)
declare -A MIN_S=([convergence]=60 [device_map]=45)
declare -A GROUP=([all]="${STAGES[*]}"
                  [kernel-stages]="setup tests convergence kernels"
                  [model-stages]="setup trainer generation device_map diffusion distributed")
# one session: the issue's order of value, limits that fit 540 s, then spare stages
SESSION=(setup tests-core tests-sweep kernels trainer-1.5b decode-1.5b)
SESSION_SPARE=(convergence device_map distributed diffusion)
declare -A SESSION_LIMIT=([setup]=30 [tests-core]=90 [tests-sweep]=150 [kernels]=110
                          [trainer-1.5b]=60 [decode-1.5b]=80)
SESSION_BUDGET=540

describe() {
  case $1 in
    setup) echo "install this checkout (and .whl/ wheels) offline into a temporary folder; versions" ;;
    tests) echo "gpu lane: every kernel configuration x dtype vs float64, CUDA graphs, training" ;;
    tests-core) echo "gpu lane, quick: CUDA graphs (steered decode step, per-request map), kernels at paper shapes" ;;
    tests-sweep) echo "gpu lane, exhaustive: every kernel configuration x dtype vs float64" ;;
    convergence) echo "bench/convergence.py: 30-step runs, Triton vs torch, fp32 and bf16" ;;
    kernels) echo "bench/kernels_gpu.py: loss and affine map vs eager and torch.compile, copy bandwidth" ;;
    trainer) echo "bench/trainer_step.py --qwen 1.5B 7B: lf.train step vs reference trainer, MFU" ;;
    trainer-1.5b) echo "bench/trainer_step.py --qwen 1.5B: lf.train step vs reference trainer, MFU" ;;
    generation) echo "bench/generation.py --qwen 1.5B 7B: decode/prefill per provider" ;;
    decode-1.5b) echo "bench/generation.py --qwen 1.5B: unsteered, folded, fused norms decode" ;;
    device_map) echo "bench/device_map.py: Qwen2.5-1.5B half offloaded to CPU vs whole on GPU" ;;
    diffusion) echo "bench/diffusion.py --sdxl: SDXL-sized UNet (needs diffusers)" ;;
    distributed) echo "bench/distributed.py: data-parallel steps over 1, 2, 4, 8 GPUs present (NCCL)" ;;
  esac
}
bad() { echo "gpu_run.sh: $*" >&2; exit 2; }

BUDGET="" ARCHIVE="" PLAN=0 DRY=0 FETCH=0 names=()
declare -A SPARE=() USER_LIMIT=()
session=0
while [ $# -gt 0 ]; do
  case $1 in
    --budget-s) [[ ${2:-} =~ ^[0-9]+$ ]] || bad "--budget-s needs whole seconds, got '${2:-}'"
                BUDGET=$2; shift ;;
    --limit) [[ ${2:-} =~ ^([a-z0-9_.-]+)=([0-9]+)$ ]] || bad "--limit needs STAGE=SECONDS, got '${2:-}'"
             [ -n "${LIMIT[${BASH_REMATCH[1]}]:-}" ] || bad "--limit: unknown stage ${BASH_REMATCH[1]} (${!LIMIT[*]})"
             USER_LIMIT[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; shift ;;
    --archive) [ -n "${2:-}" ] || bad "--archive needs a path"
               case $2 in /*) ARCHIVE=$2 ;; *) ARCHIVE=$PWD/$2 ;; esac; shift ;;
    --plan) PLAN=1 ;;
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) bad "unknown option $1 (see --help)" ;;
    session) session=1; names+=("${SESSION[@]}" "${SESSION_SPARE[@]}")
             for s in "${SESSION_SPARE[@]}"; do SPARE[$s]=1; done ;;
    *) if [ -n "${GROUP[$1]:-}" ]; then read -ra g <<<"${GROUP[$1]}"; names+=("${g[@]}")
       elif [ -n "${LIMIT[$1]:-}" ]; then names+=("$1")
       else bad "unknown stage $1 (stages: ${!LIMIT[*]}; groups: ${!GROUP[*]} session)"; fi ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
[ ${#names[@]} -eq 0 ] && names=("${STAGES[@]}")
if [ $session = 1 ]; then
  for s in "${!SESSION_LIMIT[@]}"; do LIMIT[$s]=${SESSION_LIMIT[$s]}; done
fi
for s in "${!USER_LIMIT[@]}"; do LIMIT[$s]=${USER_LIMIT[$s]}; done

if [ -z "${PYTHON:-}" ]; then   # the interpreter that holds torch ('python' may be another one)
  PYTHON=$(command -v python || command -v python3)
  if [ $PLAN = 0 ] && ! "$PYTHON" -c 'import torch' 2>/dev/null && command -v python3 >/dev/null; then
    PYTHON=python3
  fi
fi
PY=$("$PYTHON" -c 'import sys; print(sys.executable)') || bad "PYTHON=$PYTHON does not run"
export PY

if [ $FETCH = 1 ]; then   # pure-Python wheels: any interpreter version and platform can use them
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
fi

start=$(date +%s) sum_budget=0   # an explicit budget (and the session's) counts from here
if [ -z "$BUDGET" ]; then
  if [ $session = 1 ]; then BUDGET=$SESSION_BUDGET
  else BUDGET=0 sum_budget=1; for s in "${names[@]}"; do BUDGET=$((BUDGET + LIMIT[$s])); done; fi
fi

# planned[i]: the limit stage i gets when every stage before it runs to its limit (0: skipped;
# a spare stage plans nothing: it runs in time the others leave unused)
planned=() left=$BUDGET plan_args=()
for s in "${names[@]}"; do
  lim=$(( LIMIT[$s] < left ? LIMIT[$s] : left ))
  if [ -n "${SPARE[$s]:-}" ]; then planned+=(spare); plan_args+=("$s=${LIMIT[$s]}:spare")
  elif [ "$lim" -lt "${MIN_S[$s]:-$MIN_STAGE_S}" ]; then planned+=(0); plan_args+=("$s=0")
  else planned+=("$lim"); left=$((left - lim)); plan_args+=("$s=$lim"); fi
done
if [ $PLAN = 1 ]; then
  spares=()
  for i in "${!names[@]}"; do
    s=${names[$i]} p=${planned[$i]}
    if [ "$p" = spare ]; then spares+=("$s")
      printf '%-13s spare    %s (up to %s s, only in time left unused)\n' "$s" "$(describe "$s")" "${LIMIT[$s]}"
    elif [ "$p" = 0 ]; then printf '%-13s skipped  %s (budget spent)\n' "$s" "$(describe "$s")"
    else printf '%-13s %5s s  %s%s\n' "$s" "$p" "$(describe "$s")" \
      "$([ "$p" -lt "${LIMIT[$s]}" ] && echo " (cut from ${LIMIT[$s]} s by the budget)")"; fi
  done
  echo "total $((BUDGET - left)) s of limits within a budget of $BUDGET s; python: $PY"
  [ ${#spares[@]} -gt 0 ] && echo "spare: ${spares[*]} run in the ${left} s left and in any time the stages above leave unused"
  exit 0
fi

export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONSAFEPATH=1 DRY NOT_RUNNABLE
# compiler caches under the project's cache folder (not the temporary directory), as tests/run.sh
cache=${LINEAS_FAST_CACHE:-$HOME/.cache/lineas_fast}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$cache/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$cache/torchinductor}
if [ -z "${LINEAS_FAST_COMMIT:-}" ]; then
  LINEAS_FAST_COMMIT=$(git rev-parse HEAD 2>/dev/null) \
    || { LINEAS_FAST_COMMIT=unknown; echo "gpu_run.sh: no .git here and LINEAS_FAST_COMMIT unset: the results will say commit unknown"; }
fi
export LINEAS_FAST_COMMIT
SITE="" CLEAN=()
trap 'if [ -n "$SITE" ]; then rm -rf "$SITE"; fi; if [ ${#CLEAN[@]} -gt 0 ]; then rm -rf "${CLEAN[@]}"; fi' EXIT
if [ $DRY = 1 ]; then
  LOGS=$(mktemp -d "${TMPDIR:-/tmp}/lineas-fast-gpu-run-dry.XXXXXX"); CLEAN+=("$LOGS")
  device=dry-run SUMMARY="" ARCHIVE=""
  echo "dry run: every stage in check mode; nothing is measured or written under bench/results"
else
  LOGS=bench/results/gpu-run-logs
  mkdir -p "$LOGS"
  device=$("$PY" bench/gpu_run_summary.py start --budget "$BUDGET" --plan "${plan_args[@]}") \
    || { echo "gpu_run.sh: $PY cannot import torch: install torch into that environment first" >&2; exit 1; }
  device=$(tail -n 1 <<<"$device")
  SUMMARY=bench/results/gpu-run-$device.json
fi
export LOGS device
[ $sum_budget = 1 ] && start=$(date +%s)   # the sum of the limits is for the stages alone

archive() {   # the device's result files, the summary and the logs, replaced whole
  [ -n "$ARCHIVE" ] || return 0
  local files
  mkdir -p "$(dirname "$ARCHIVE")"
  shopt -s nullglob; files=(bench/results/*-"$device".json "$LOGS"); shopt -u nullglob
  tar -czf "$ARCHIVE.part" "${files[@]}" && mv -f "$ARCHIVE.part" "$ARCHIVE"
}

install_site() {   # this checkout (and .whl/ wheels) into $SITE, with no package index
  local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
             --disable-pip-version-check --target "$SITE")
  if ls .whl/*.whl >/dev/null 2>&1; then
    "${pip[@]}" .whl/*.whl || return 1
  else
    echo "no .whl/ wheels: the diffusion stage needs diffusers (bash bench/gpu_run.sh --fetch-wheels)"
  fi
  "${pip[@]}" --no-build-isolation . && return 0
  # pip could not build it (no setuptools/wheel there): the package as setup.py lays it out
  [ -d lineas_fast ] && [ -d kernels ] || return 1
  echo "setup: pip could not build this checkout; copying lineas_fast/ and kernels/ (as lineas_fast.kernels) instead"
  rm -rf "$SITE/lineas_fast" && cp -r lineas_fast "$SITE/" && rm -rf "$SITE/lineas_fast/kernels" \
    && cp -r kernels "$SITE/lineas_fast/kernels"
}
setup() {     # runs in this shell: later stages inherit PYTHONPATH
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/lineas-fast-gpu-run.XXXXXX")
  export SITE
  timeout "$STAGE_LIMIT" bash -c install_site || return 1
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  fi
  timeout 60 "$PY" - "$SITE" <<'EOF'
import os, sys
import torch, triton, transformers
import lineas_fast as lf
import lineas_fast.kernels  # ./kernels, mapped at install

print("python", sys.executable, sys.version.split()[0], "torch", torch.__version__, "triton",
      triton.__version__, "transformers", transformers.__version__)
print("lineas_fast", lf.__version__, "from", lf.__file__)
if not os.path.abspath(lf.__file__).startswith(os.path.abspath(sys.argv[1])):
    sys.exit("setup: lineas_fast is not imported from the folder it was installed into")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB", "CUDA", torch.version.cuda)
elif os.environ.get("DRY") == "1":
    print("no CUDA device (dry run)")
else:
    sys.exit("setup: torch sees no CUDA device")
EOF
}
py_bench() {   # py_bench SCRIPT ARG...: a benchmark; in a dry run, with --check-args
  if [ "$DRY" = 1 ]; then set -- "$@" --check-args; fi
  "$PY" "bench/$1" "${@:2}"
}
gpu_lane() {   # gpu_lane NAME FILE...: pytest over gpu-lane files, one xdist worker per file; SIGINT
               # 15 s before the stage's limit, so that pytest still writes its summary and junit XML,
               # SIGKILL 10 s later (timeout runs it in a process group the stage's own limit misses)
  local name=$1; shift
  if [ "$DRY" = 1 ]; then   # collect them as the lane's CPU rehearsal does (tests/gpu/conftest.py)
    LINEAS_FAST_GPU_LANE_ON_CPU=1 TRITON_INTERPRET=1 "$PY" -m pytest -qq -p no:cacheprovider --collect-only "$@"
    return
  fi
  local xdist=() n=$#
  [ "$n" -gt 8 ] && n=8
  if [ "$n" -gt 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then xdist=(-n "$n" --dist loadfile); fi
  timeout -s INT -k 10 "$(( STAGE_LIMIT > 30 ? STAGE_LIMIT - 15 : STAGE_LIMIT ))" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider "${xdist[@]}" --junitxml "$LOGS/$name-$device.xml" "$@"
}
stage_tests() { gpu_lane tests tests/gpu/test_*.py; }
stage_tests_core() {
  gpu_lane tests-core tests/gpu/test_cuda_graph.py tests/gpu/test_slot_steer_cuda_graph.py tests/gpu/test_gpu_kernels.py
}
stage_tests_sweep() { gpu_lane tests-sweep tests/gpu/test_every_configuration_*.py; }
stage_convergence() { py_bench convergence.py; }
stage_kernels() { py_bench kernels_gpu.py --compile-at 56x3584; }
stage_trainer() { py_bench trainer_step.py --qwen 1.5B 7B; }
stage_trainer_1_5b() { py_bench trainer_step.py --qwen 1.5B; }
stage_generation() { py_bench generation.py --qwen 1.5B 7B --repeats 3; }
stage_decode_1_5b() {
  py_bench generation.py --qwen 1.5B --providers unsteered folded fused_norms --batch 1 16 --repeats 3
}
stage_device_map() { py_bench device_map.py --size 1.5B; }
stage_diffusion() { py_bench diffusion.py --sdxl; }   # exits 69 at once without diffusers
stage_distributed() {   # 1, 2, 4, 8 processes, as many as there are GPUs
  local n procs=()
  if [ "$DRY" = 1 ]; then py_bench distributed.py --procs 1 2; return; fi
  n=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || return 1
  for k in 1 2 4 8; do [ "$k" -le "$n" ] && procs+=("$k"); done
  [ ${#procs[@]} -gt 0 ] || { echo "not runnable here: no CUDA device"; return "$NOT_RUNNABLE"; }
  py_bench distributed.py --procs "${procs[@]}"
}
export -f install_site py_bench gpu_lane

record() {   # record STAGE EXIT SECONDS LIMIT [REASON]: the summary, then the archive
  [ -n "$SUMMARY" ] || return 0
  "$PY" bench/gpu_run_summary.py stage "$SUMMARY" "$1" "$2" "$3" "$4" --reason "${5:-}" \
    ${SPARE[$1]:+--spare}
  archive
}

status=0
archive
for s in "${names[@]}"; do
  left=$(( BUDGET - ($(date +%s) - start) ))
  limit=$(( LIMIT[$s] < left ? LIMIT[$s] : left ))
  if [ "$limit" -lt "${MIN_S[$s]:-$MIN_STAGE_S}" ]; then
    echo "=== stage $s: skipped, ${left}s left of the ${BUDGET}s budget"
    [ -n "${SPARE[$s]:-}" ] || status=1
    record "$s" skipped 0 0 "budget spent: ${left} s left of ${BUDGET} s"; continue
  fi
  echo "=== stage $s (limit ${limit} s): $(describe "$s")"
  export STAGE_LIMIT=$limit
  t0=$(date +%s)
  if [ "$s" = setup ]; then
    setup > >(tee "$LOGS/$s.log") 2>&1; rc=$?
  else
    fn=stage_${s//[.-]/_}
    export -f "$fn"
    # not a pipeline: a process the stage leaves behind holding its output cannot block the run
    # (a group: its redirection, so the tee, is this shell's own)
    { timeout --kill-after=5 "$limit" bash -c "$fn"; } > >(tee "$LOGS/$s.log") 2>&1; rc=$?
  fi
  tee_pid=${!:-}   # the log complete (its tee gone), for at most 5 s
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -n "$tee_pid" ] && kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.5; done
  secs=$(( $(date +%s) - t0 ))
  reason=""
  if [ $rc -eq "$NOT_RUNNABLE" ]; then
    reason=$(grep -o 'not runnable here: .*' "$LOGS/$s.log" | tail -n 1)
    echo "=== stage $s: ${reason:-not runnable here}"
    [ -n "${SPARE[$s]:-}" ] || status=1
    record "$s" skipped "$secs" "$limit" "${reason:-not runnable here}"; continue
  fi
  [ $rc -eq 124 ] && echo "stage $s: stopped at its ${limit} s limit"
  echo "=== stage $s: exit $rc in ${secs}s"
  [ $rc -ne 0 ] && status=1
  record "$s" "$rc" "$secs" "$limit"
done

if [ -n "$SUMMARY" ]; then
  "$PY" bench/gpu_run_summary.py finish "$SUMMARY" "$status"
  archive && [ -n "$ARCHIVE" ] && echo "results: $ARCHIVE"
fi
[ $DRY = 1 ] && echo "dry run: $([ $status = 0 ] && echo "every stage's check passed" || echo "a check failed")"
exit $status
