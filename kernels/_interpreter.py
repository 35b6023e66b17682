"""Work-arounds for the Triton 3.6 interpreter (TRITON_INTERPRET=1); compiled GPU kernels never contain them.

Measured here: the interpreter casts float32 to bfloat16 by truncating the low 16 bits (round toward zero), where
a GPU and torch round to nearest even. Truncation always errs toward zero, so through a network the bias adds up:
fused ResNet-18 in bfloat16 drifted to 3.4e-2 relative error against float64, while eager bfloat16 stays at 5e-3.
Kernels round explicitly under a constexpr that launchers set only when interpreting.

And its loops cannot take a runtime scalar as a bound under NumPy 2.4: `_patch_scalar_index` fixes that at import,
only when interpreting.
"""

import triton
import triton.language as tl
from triton.runtime import interpreter

from kernels._common import interpreting


@triton.jit
def round_to_bfloat16(x):
    """x float32 -> float32 holding the nearest-even bfloat16 value, so a following truncating cast is exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)  # round half to even on the 16 bits that the cast drops
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


def _index_scalar(tensor: tl.tensor) -> int:
    return int(tensor.handle.data.item())


def _patch_scalar_index() -> None:
    """Let runtime scalars bound `tl.range` loops under the interpreter, as they do on a GPU.

    The Triton 3.6 interpreter holds every scalar (program ids, integer arguments) as a numpy array of shape (1,) and
    converts loop bounds with ``int(array)``, which NumPy 2.4 refuses for arrays with a dimension ("only
    0-dimensional arrays can be converted to Python scalars"). The persistent and split-K kernels loop over
    `tl.range(tl.program_id(0), num_tiles, tl.num_programs(0))`; rewriting them with constexpr bounds would compile
    one GPU kernel per batch size. So ``tensor.__index__`` is re-bound, inside the interpreter's own patch scope
    (restored with it after every launch), to ``int(array.item())``, which NumPy takes for any one-element array.
    """
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index_scalar)

    interpreter._patch_lang_tensor = patch_lang_tensor


if interpreting():
    _patch_scalar_index()
