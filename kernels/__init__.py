"""Fused Triton kernels for ResNet inference on NHWC tensors: the package's public API.

Callers outside kernels/ import from here, never from a module of it: the launchers (each checks its arguments,
allocates its output and launches), the weight packers they expect, the dtypes they take, whether Triton is
interpreting, and the autotuners' records (where their cache lives, what each chose, what came from the cache).
Importing this package decides, once per process, whether Triton interprets (TRITON_INTERPRET=1 set before it) or
compiles: `@triton.jit` reads the variable when each kernel is defined.

The launchers `conv_bn_act` and `avgpool_linear` share their names with the modules that define them; here the name
is the function (import a module itself, e.g. for its private kernel, with `from kernels.conv_bn_act import ...`).
"""

from kernels._common import SUPPORTED_DTYPES, interpreting
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
from kernels.conv_bn_act import conv_bn_act, pack_conv_weight
from kernels.maxpool import max_pool2d_nhwc

__all__ = [
    "SUPPORTED_DTYPES",
    "Launch",
    "autotuners",
    "avgpool_linear",
    "conv_bn_act",
    "describe_config",
    "describe_outcomes",
    "interpreting",
    "max_pool2d_nhwc",
    "outcome_counts",
    "pack_conv_weight",
    "pack_linear_weight",
    "recording_launches",
    "use_cache_dir",
]
