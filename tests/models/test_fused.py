"""Whole-model parity: models.fuse(build(name)) against the eager model it was built from.

On a CPU the kernels run under the Triton interpreter, so inputs are small and non-square; the `gpu` tests repeat
the comparison at 224x224 in every dtype. Random weights come with random BatchNorm statistics (models.build).
"""

import pytest
import torch

import models
from models import digits

ALL_ARCHS = [name for name in models.MODEL_NAMES if name != "digits_resnet"]

# (dtype, max relative error against the float64 reference) kept together, DESIGN.md "Numerics".
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def dtype_id(dtype: torch.dtype) -> str:
    """Test ids that name the dtype ("bfloat16", not "dtype2"), so that `-k bfloat16` selects those cases."""
    return str(dtype).removeprefix("torch.")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_same_top1(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    """Top-1 must agree; for half precision only where the reference's top-2 margin exceeds the worst abs error,
    since a closer race is decided by rounding that the relative-error bound already allows."""
    top2 = ref.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    decided = torch.ones_like(margin, dtype=torch.bool) if exact else margin > (out - ref).abs().max() * 2
    disagree = (out.argmax(1) != ref.argmax(1)) & decided
    assert not disagree.any(), f"top-1 differs on rows {disagree.nonzero().flatten().tolist()} (margins {margin})"


def check_model_parity(name: str, dtype: torch.dtype, x: torch.Tensor, num_classes: int | None = None) -> None:
    model = models.build(name, seed=1, num_classes=num_classes).to(x.device)
    fused = models.fuse(model, dtype=dtype)
    with torch.inference_mode():
        out = fused(x)
        eager = model(x)
        ref = model.double()(x.double())
    assert out.dtype == torch.float32
    assert out.shape == eager.shape
    err = relative_error(out, ref)
    assert err < TOLERANCES[dtype], f"{name} {dtype}: relative error {err:.2e} >= {TOLERANCES[dtype]:.0e}"
    # Against the float64 run, not `eager`: on a GPU eager float32 convolutions take TF32 (cuDNN's default), whose
    # 1e-3 error decides close top-2 races among 1000 classes differently from an IEEE float32 kernel.
    assert_same_top1(out, ref.float(), exact=dtype == torch.float32)


@pytest.mark.parametrize(
    ("name", "batch", "height", "width"),
    [
        ("resnet18", 3, 40, 56),
        ("resnet34", 1, 56, 40),
        ("resnet50", 2, 40, 56),
        ("resnet101", 1, 33, 47),
        ("resnet152", 1, 32, 40),
        ("preact_resnet18", 3, 40, 56),
        ("preact_resnet50", 1, 47, 33),
        ("digits_resnet", 3, 32, 24),
    ],
)
def test_fused_matches_eager_float32(name, batch, height, width):
    check_model_parity(name, torch.float32, torch.randn(batch, 3, height, width), num_classes=10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
def test_fused_matches_eager_half_precision(name, dtype):
    check_model_parity(name, dtype, torch.randn(3, 3, 40, 48), num_classes=10)


def test_digits_fused_predicts_like_eager_on_held_out_scans():
    model = models.build("digits_resnet", weights="pretrained")
    fused = models.fuse(model)
    _, held_out = digits.load_split()
    images, labels = digits.preprocess_images(held_out.images), torch.from_numpy(held_out.labels)
    with torch.inference_mode():
        eager_pred = model(images).argmax(1)
        fused_pred = fused(images).argmax(1)
    assert torch.equal(fused_pred, eager_pred), f"{(fused_pred != eager_pred).sum()} of {len(labels)} differ"
    assert (fused_pred == labels).float().mean() >= 0.97


def test_fuse_rejects_bad_arguments():
    model = models.build("digits_resnet")
    with pytest.raises(ValueError, match="dtype"):
        models.fuse(model, dtype=torch.float64)
    with pytest.raises(ValueError, match="ResNet"):
        models.fuse(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="eval"):
        models.fuse(models.build("digits_resnet").train())
    fused = models.fuse(model)
    with pytest.raises(ValueError, match="NCHW"):
        fused(torch.randn(2, 32, 32, 3))
    with pytest.raises(ValueError, match="float32"):
        fused(torch.randn(2, 3, 32, 32, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", ALL_ARCHS)
def test_fused_matches_eager_at_224_on_gpu(name, dtype, batch):
    check_model_parity(name, dtype, torch.randn(batch, 3, 224, 224, device="cuda"))
