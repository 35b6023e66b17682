"""Fused Triton kernels for ResNet inference on NHWC tensors: the package's public API.

Callers outside kernels/ import from here, never from a module of it: the launchers (each checks its arguments,
allocates its output and launches), what each convolution form supports (TMA forms: sm_90, 16-byte rows), the
weight packers they expect (the stem's space-to-depth cells too), the dtypes they take, whether Triton is
interpreting, and the autotuners' records (where their cache lives, what each chose, what came from the cache).
Importing this package decides, once per process, whether Triton interprets (TRITON_INTERPRET=1 set before it) or
compiles: `@triton.jit` reads the variable when each kernel is defined.

The launchers `conv_bn_act`, `conv1x1_tma`, `conv_tma` and `avgpool_linear` share their names with the modules that
define them; here the name is the function (a test that needs a module's private kernel imports it with
`from kernels.conv_bn_act import ...`).
"""

from kernels._common import SUPPORTED_DTYPES, interpreting
from kernels._tma import tma_channels_ok, tma_device, tma_operands
from kernels.autotune import (
    Launch,
    autotuners,
    describe_config,
    describe_outcomes,
    outcome_counts,
    recording_launches,
    use_cache_dir,
)
from kernels.avgpool_linear import avgpool_linear, pack_linear_weight
from kernels.conv1x1_tma import conv1x1_tma
from kernels.conv1x1_tma import supports as conv1x1_tma_supports
from kernels.conv_bn_act import conv_bn_act, pack_conv_weight
from kernels.conv_tma import conv_tma
from kernels.conv_tma import supports as conv_tma_supports
from kernels.maxpool import max_pool2d_nhwc
from kernels.space_to_depth import (
    CELL,
    CELL_CHANNELS,
    CELL_VALUES,
    pack_space_to_depth_weight,
    space_to_depth,
    space_to_depth_channels,
    space_to_depth_geometry,
)

__all__ = [
    "CELL",
    "CELL_CHANNELS",
    "CELL_VALUES",
    "SUPPORTED_DTYPES",
    "Launch",
    "autotuners",
    "avgpool_linear",
    "conv1x1_tma",
    "conv1x1_tma_supports",
    "conv_bn_act",
    "conv_tma",
    "conv_tma_supports",
    "describe_config",
    "describe_outcomes",
    "interpreting",
    "max_pool2d_nhwc",
    "outcome_counts",
    "pack_conv_weight",
    "pack_linear_weight",
    "pack_space_to_depth_weight",
    "recording_launches",
    "space_to_depth",
    "space_to_depth_channels",
    "space_to_depth_geometry",
    "tma_channels_ok",
    "tma_device",
    "tma_operands",
    "use_cache_dir",
]
