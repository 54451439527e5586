"""lineas_fast: fast LinEAS activation steering (see README.md)."""

from ._version import __version__  # noqa: E402
from .functional import affine_steer, gated_steer  # noqa: E402
from .fused_norm import SteeredRMSNorm, fuse_in_memory, unfuse_in_memory  # noqa: E402
from .fusion import FusionError, fuse  # noqa: E402
from .gates import fit_gate, fit_gates, gate_openings  # noqa: E402
from .gguf_fold import fuse_gguf  # noqa: E402
from .hooks import AlreadySteeredError  # noqa: E402
from .linear_act import fit_linear_act, fit_mean_shift, linear_act_map  # noqa: E402
from .steering import Steering, SteeringHandle, model_fingerprint  # noqa: E402
from .targets import LanguageModelTarget, PipelineTarget, Target, as_target  # noqa: E402
from .trainer import Trainer, TrainingDivergedError, train  # noqa: E402
from .wasserstein import (
    PackedTargetProfile,
    TargetProfile,
    pack_profiles,  # noqa: E402
    sliced_wasserstein,
)

__all__ = [
    "affine_steer",
    "gated_steer",
    "sliced_wasserstein",
    "TargetProfile",
    "PackedTargetProfile",
    "pack_profiles",
    "Steering",
    "SteeringHandle",
    "model_fingerprint",
    "train",
    "Trainer",
    "TrainingDivergedError",
    "fuse",
    "fuse_gguf",
    "FusionError",
    "fuse_in_memory",
    "unfuse_in_memory",
    "SteeredRMSNorm",
    "linear_act_map",
    "fit_linear_act",
    "fit_mean_shift",
    "fit_gates",
    "fit_gate",
    "gate_openings",
    "AlreadySteeredError",
    "Target",
    "LanguageModelTarget",
    "PipelineTarget",
    "as_target",
    "__version__",
]
