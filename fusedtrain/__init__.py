"""fusedtrain: fused kernels for PyTorch mixed-precision training.

    from fusedtrain import FusedBCEWithLogits, FusedAdam, FusedAdamW, GradScaler
"""
from fusedtrain import functional
from fusedtrain._backend import BackendError, backends, use_backend
from fusedtrain._version import __version__
from fusedtrain.amp import GradScaler, clipped_step_
from fusedtrain.nn import FusedAsymmetricLoss, FusedBCEWithLogits, FusedLinearBCEWithLogits, FusedSigmoidFocalLoss
from fusedtrain.ops.unscale import unscale_and_check_
from fusedtrain.optim import FusedAdam, FusedAdamW
from fusedtrain.schedule import SkipAwareLambdaLR

__all__ = [
    "BackendError",
    "FusedAdam",
    "FusedAdamW",
    "FusedAsymmetricLoss",
    "FusedBCEWithLogits",
    "FusedLinearBCEWithLogits",
    "FusedSigmoidFocalLoss",
    "GradScaler",
    "SkipAwareLambdaLR",
    "backends",
    "clipped_step_",
    "functional",
    "unscale_and_check_",
    "use_backend",
]
