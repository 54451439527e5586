"""lineas_fast: fast LinEAS activation steering (see README.md and SPEC)."""
from .functional import affine_steer
from .wasserstein import PackedTargetProfile, TargetProfile, pack_profiles, sliced_wasserstein

__version__ = "0.1.0"

__all__ = ["affine_steer", "sliced_wasserstein", "TargetProfile", "PackedTargetProfile",
           "pack_profiles", "__version__"]
