"""Triton kernels of lineas_fast, each beside its plain-PyTorch reference.

* ``wasserstein.py`` / ``wasserstein_ref.py``: the packed per-coordinate 1-D W2² loss.
* ``affine_steer.py`` / ``affine_steer_ref.py``: z + λ((ω−1)⊙z + b), forward and backward.
* ``registry.py``: every kernel with the constexpr configurations its host wrapper can pick
  (used by the ahead-of-time compile lane, ``lineas_fast.kernels.compile_check``).
"""
