#!/usr/bin/env bash
# The project's test command: a lint lane, then five pytest lanes (see tests/conftest.py).
#   bash tests/run.sh            all lanes, in order: lint gpu cpu interpret compile serving
# (gpu early: where it collects nothing, pytest's "no tests ran" is not the last pytest summary)
#   bash tests/run.sh cpu        some lanes: lint | cpu | interpret | compile | gpu | serving
# `serving` runs tests/serving in its own virtual environment with vLLM's CPU build and
# llama.cpp, made or reused by tests/serving/venv.sh (first time: ~6 min for the venv, ~11 min
# to build llama.cpp on 2 idle cores; cached afterwards; LINEAS_FAST_LLAMA_CPP=skip leaves the
# build out when its wheel is not cached).
# Each lane writes a junit XML; after the last lane one line alone gives the totals over all
# lanes, and nothing follows it:
#   tests: N passed, N failed, N skipped
# (failed counts failures and errors; the lint lane counts one passed check when clean and one
# failure per finding; a lane that fails without a count of its own, e.g. a crashed pytest,
# counts as one failure). The exit status is non-zero when any lane failed. pytest's exit code 5
# (nothing collected) counts as a pass, for a lane that collects nothing (gpu without CUDA).
set -u
cd "$(dirname "$0")/.."
export TRITON_DEFAULT_FP_FUSION=1
if [ $# -eq 0 ]; then set -- lint gpu cpu interpret compile serving; fi
for lane in "$@"; do
  case $lane in
    lint | cpu | interpret | compile | gpu | serving) ;;
    *) echo "unknown lane $lane (lint | cpu | interpret | compile | gpu | serving)"; exit 2 ;;
  esac
done
junit=$(mktemp -d)
trap 'rm -rf "$junit"' EXIT
status=0
failed_lanes=()

run_lane() {      # run_lane NAME COMMAND...: the command writes $junit/NAME.xml
  local name=$1; shift
  echo "=== lane: $name"
  "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "lane $name collected no tests"; rc=0; fi
  if [ $rc -ne 0 ]; then status=1; failed_lanes+=("$name"); fi
}

lint() {          # ruff check (findings for people, then as junit for the counts), ruff format --check
  python -m ruff check --output-format concise .
  local rc=$?
  python -m ruff check --output-format junit --output-file "$junit/lint.xml" . >/dev/null 2>&1
  python -m ruff format --check . || { rc=1; format_failures; }
  return $rc
}

format_failures() {   # one junit failure per file ruff format would change
  python -m ruff format --check . 2>/dev/null | python -c '
import sys
from xml.sax.saxutils import escape
files = [line.split(" ", 2)[2] for line in sys.stdin if line.startswith("Would reformat: ")]
cases = "".join(f"<testcase name=\"format {escape(f)}\"><failure message=\"not formatted\"/></testcase>" for f in files)
print(f"<testsuite name=\"format\" tests=\"{len(files)}\" failures=\"{len(files)}\">{cases}</testsuite>")
' > "$junit/lint-format.xml"
}

serving() {       # the venv (made or reused), then tests/serving with its python
  local py
  py=$(bash tests/serving/venv.sh) || { echo "serving venv could not be made"; return 1; }
  "$py" -m pytest -q "$@" tests/serving
}

for lane in "$@"; do
  xml=(--junitxml "$junit/$lane.xml")
  case $lane in
    lint) run_lane lint lint ;;
    cpu) run_lane cpu python -m pytest -q "${xml[@]}" tests/cpu ;;
    interpret) run_lane interpret env TRITON_INTERPRET=1 python -m pytest -q "${xml[@]}" tests/interpret ;;
    compile) run_lane compile python -m pytest -q "${xml[@]}" tests/compile ;;
    gpu) run_lane gpu python -m pytest -q "${xml[@]}" tests/gpu ;;
    serving) run_lane serving serving "${xml[@]}" ;;
  esac
done

[ ${#failed_lanes[@]} -gt 0 ] && echo "failed lanes: ${failed_lanes[*]}"
python - "$junit" ${failed_lanes[@]+"${failed_lanes[@]}"} <<'EOF' || { echo "tests: 0 passed, 1 failed, 0 skipped"; exit 1; }
import glob, os, sys
import xml.etree.ElementTree as ET

folder, failed_lanes = sys.argv[1], set(sys.argv[2:])
passed = failed = skipped = 0
counted_failures = set()
for path in sorted(glob.glob(os.path.join(folder, "*.xml"))):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        tests, fails, errs, skips = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += max(0, tests - fails - errs - skips)
        failed += fails + errs
        skipped += skips
        if fails + errs:
            counted_failures.add(os.path.basename(path)[:-4])
# a lane that failed with nothing counted (no XML written, or a crash after the tests) is one failure
failed += len(failed_lanes - counted_failures)
print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
EOF
exit $status
