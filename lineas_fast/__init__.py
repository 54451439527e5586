"""lineas_fast: fast LinEAS activation steering (see README.md)."""

from lineas_fast._version import __version__
from lineas_fast.apps.calibrate import StrengthCalibration, calibrate_strength
from lineas_fast.fold.fused_norm import SteeredRMSNorm, fuse_in_memory, unfuse_in_memory
from lineas_fast.fold.fusion import FusionError, fuse
from lineas_fast.fold.gguf import fuse_gguf
from lineas_fast.functional import affine_steer, gated_steer
from lineas_fast.hooks import AlreadySteeredError
from lineas_fast.steering import Steering, SteeringHandle, model_fingerprint
from lineas_fast.targets import LanguageModelTarget, PipelineTarget, Target, as_target
from lineas_fast.training.gates import fit_gate, fit_gates, gate_openings
from lineas_fast.training.iti import fit_iti_c
from lineas_fast.training.linear_act import fit_linear_act, fit_mean_shift, linear_act_map
from lineas_fast.training.trainer import Trainer, TrainingDivergedError, train
from lineas_fast.wasserstein import (
    PackedTargetProfile,
    TargetProfile,
    pack_profiles,
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
    "fit_iti_c",
    "fit_gates",
    "fit_gate",
    "gate_openings",
    "calibrate_strength",
    "StrengthCalibration",
    "AlreadySteeredError",
    "Target",
    "LanguageModelTarget",
    "PipelineTarget",
    "as_target",
    "__version__",
]
