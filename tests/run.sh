#!/usr/bin/env bash
# The project's test command: three pytest lanes (see tests/conftest.py).
#   bash tests/run.sh            all lanes
#   bash tests/run.sh cpu        one lane: cpu | interpret | compile | gpu
# pytest's exit code 5 (nothing collected) counts as a pass, for a lane that collects nothing.
set -u
cd "$(dirname "$0")/.."
export TRITON_DEFAULT_FP_FUSION=1
lanes=("${@:-cpu interpret compile gpu}")
status=0
run_lane() {
  local name=$1; shift
  echo "=== lane: $name"
  "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "lane $name collected no tests"; rc=0; fi
  if [ $rc -ne 0 ]; then status=1; fi
}
for lane in ${lanes[@]}; do
  case $lane in
    cpu) run_lane cpu python -m pytest -q tests/cpu ;;
    interpret) run_lane interpret env TRITON_INTERPRET=1 python -m pytest -q tests/interpret ;;
    compile) run_lane compile python -m pytest -q tests/compile ;;
    gpu) run_lane gpu python -m pytest -q tests/gpu ;;
    *) echo "unknown lane $lane (cpu | interpret | compile | gpu)"; exit 2 ;;
  esac
done
exit $status
