"""Dynamic convolution layers (Chen et al., CVPR 2020): the modules, their routers and math.

How they compute fast (the strategies, ``STRATEGIES``, ``select_strategy``, autotune) is in
``dynconvert.engine``.
"""

from .conv2d_same import DynamicConv2dSame
from .dynamic_conv import DynamicConv1d, DynamicConv2d, DynamicConv3d, DynamicConvNd
from .routers import KernelAttention, PooledRouter, Router, SoftmaxRouter
from .start import StartFn, zero_sum_kernels
from .std_conv import DynamicStdConv2d

__all__ = [
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
    "zero_sum_kernels",
]
