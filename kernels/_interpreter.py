"""Work-arounds for the Triton 3.6 interpreter (TRITON_INTERPRET=1), switched on by constexpr flags that launchers
set only when interpreting; compiled GPU kernels never contain them.

Measured here: the interpreter casts float32 to bfloat16 by truncating the low 16 bits (round toward zero), where
a GPU and torch round to nearest even. Truncation always errs toward zero, so through a network the bias adds up:
fused ResNet-18 in bfloat16 drifted to 3.4e-2 relative error against float64, while eager bfloat16 stays at 5e-3.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_bfloat16(x):
    """x float32 -> float32 holding the nearest-even bfloat16 value, so a following truncating cast is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 bits that the cast drops
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
