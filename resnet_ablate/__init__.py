"""resnet-ablate: architecture ablations of residual networks on fused Triton kernels."""

__version__ = "0.1.0"
