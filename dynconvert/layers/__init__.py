"""Dynamic convolution layers (Chen et al., CVPR 2020) and their routers."""

from .conv2d_same import DynamicConv2dSame
from .dynamic_conv import DynamicConv1d, DynamicConv2d, DynamicConv3d, DynamicConvNd
from .routers import KernelAttention, PooledRouter, Router, SoftmaxRouter
from .start import StartFn, zero_sum_kernels
from .std_conv import DynamicStdConv2d
from .strategies import STRATEGIES, select_strategy

__all__ = [
    "STRATEGIES",
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv2dSame",
    "DynamicConv3d",
    "DynamicConvNd",
    "DynamicStdConv2d",
    "KernelAttention",
    "PooledRouter",
    "Router",
    "SoftmaxRouter",
    "StartFn",
    "select_strategy",
    "zero_sum_kernels",
]
