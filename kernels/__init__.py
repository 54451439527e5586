"""Triton kernels of lineas_fast, named one way: ``NAME.py`` holds the Triton kernel and its host
launcher (and imports Triton), ``NAME_ref.py`` its plain-PyTorch reference together with the
launch facts the library reads without Triton, and ``ops.py`` registers every kernel as a
PyTorch custom op (one op each, the reference on one branch and the launcher on the other).

* ``wasserstein.py`` / ``wasserstein_ref.py``: the per-coordinate 1-D W2² loss over all
  layers in one launch (layers read in place through a table, cached).
* ``affine_steer.py`` / ``affine_steer_ref.py``: z + λ((ω−1)⊙z + b), forward and backward.
* ``gated_steer.py`` / ``gated_steer_ref.py``: DSAS, the gate's dot product and the map fused.
* ``rms_norm_shift.py`` / ``rms_norm_shift_ref.py``: RMSNorm with the steering shift (inference);
  the kernel's ``MAX_D`` lives in the reference module, readable without Triton.
* ``ops.py``: the four kernels as PyTorch custom ops (autograd, fake tensors), so a steered
  model runs under ``torch.compile(fullgraph=True)`` and in CUDA graphs.
* ``_backend.py``: which path runs (``use_triton``); Triton is optional (``triton_available``):
  only the kernel modules import it, and the library imports them only on the Triton branch.
* ``registry.py``: every kernel with the constexpr configurations its host wrapper can pick
  (used by the ahead-of-time compile lane, ``lineas_fast.kernels.compile_check``).
"""

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by tests/cpu/test_install.py
    # This folder is ``lineas_fast.kernels``. Python finds it as a top-level ``kernels`` only when
    # the repository root is on sys.path (``python -m ...``, ``python -c`` or a script run from the
    # root), where it would shadow the PyPI package ``kernels`` (Hugging Face's, which recent
    # transformers imports). Hand the import over to that package where it is installed.
    import importlib.util as _util
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _path = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root]

    _spec = _PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
    # else: no such package here; this module stays an inert docstring (transformers probes the
    # name and must not fail)
