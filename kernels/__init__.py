"""resnet_ablate.kernels: fused BatchNorm + residual add + ReLU in Triton, with a PyTorch path.

Depends on torch and triton only; knows nothing of the rest of the toolkit.
"""

from .backends import BACKENDS, TRITON_INTERPRETED, Backend, get_backend, set_backend, use_backend
from .batch_norm import fused_batch_norm
from .modules import FusedBatchNorm2d

__all__ = [
    "BACKENDS",
    "TRITON_INTERPRETED",
    "Backend",
    "FusedBatchNorm2d",
    "fused_batch_norm",
    "get_backend",
    "set_backend",
    "use_backend",
]
