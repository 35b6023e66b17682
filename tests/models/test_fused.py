"""Whole-model parity: models.fuse(build(name)) against the eager model it was built from.

On a CPU the kernels run under the Triton interpreter, so inputs are small and non-square; the `gpu` tests repeat
the comparison at 224x224 in every dtype. Random weights come with random BatchNorm statistics (models.build).
"""

import pytest
import torch

import models
from models import digits
from tests.support.numerics import TOLERANCES, assert_relative_close

ALL_ARCHS = [name for name in models.MODEL_NAMES if name != "digits_resnet"]


def dtype_id(dtype: torch.dtype) -> str:
    """Test ids that name the dtype ("bfloat16", not "dtype2"), so that `-k bfloat16` selects those cases."""
    return str(dtype).removeprefix("torch.")


def assert_same_top1(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, min_decided: int) -> None:
    """Top-1 agrees on every row that the tolerance decides: in float32 all of them; in half precision those whose
    reference top-2 margin exceeds twice the error TOLERANCES[dtype] allows at that row's scale (its RMS logit). A
    closer race is rounding's to decide. At least `min_decided` rows must be decided, or the check checks nothing.

    The bound comes from the tolerance, not from this run's error: a row whose top logits are off by more than the
    tolerance allows fails here even when the whole batch's relative error passes."""
    tolerance = 0.0 if dtype == torch.float32 else TOLERANCES[dtype]
    reach = 2 * tolerance * ref.pow(2).mean(dim=1).sqrt()  # [N]
    top2 = ref.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    decided = margin > reach
    assert int(decided.sum()) >= min_decided, (
        f"only {int(decided.sum())} of {len(ref)} rows are decided (need {min_decided}): "
        f"margins {margin.tolist()}, reach {reach.tolist()}"
    )
    disagree = (out.argmax(1) != ref.argmax(1)) & decided
    assert not disagree.any(), f"top-1 differs on decided rows {disagree.nonzero().flatten().tolist()}"


def check_model_parity(
    name: str, dtype: torch.dtype, x: torch.Tensor, num_classes: int | None = None, min_decided: int | None = None
) -> None:
    """Fused against eager in float64: the relative error within TOLERANCES[dtype], and the top-1 (every row decided
    in float32; at least `min_decided` rows, default all, in half precision)."""
    model = models.build(name, seed=1, num_classes=num_classes).to(x.device)
    fused = models.fuse(model, dtype=dtype)
    with torch.inference_mode():
        out = fused(x)
        eager = model(x)
        ref = model.double()(x.double())
    assert out.dtype == torch.float32
    assert out.shape == eager.shape
    assert_relative_close(out, ref, TOLERANCES[dtype], what=f"{name} {dtype} logits")
    # Against the float64 run, not `eager`: on a GPU eager float32 convolutions take TF32 (cuDNN's default), whose
    # 1e-3 error decides close top-2 races among 1000 classes differently from an IEEE float32 kernel.
    assert_same_top1(out, ref.float(), dtype, len(x) if dtype == torch.float32 or min_decided is None else min_decided)


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
    # 2 of 3: these seeds give preact_resnet18 one row whose top two logits are 2e-3 apart, a race rounding decides.
    check_model_parity(name, dtype, torch.randn(3, 3, 40, 48), num_classes=10, min_decided=2)


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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float64 NCHW as torchvision's ToTensor + Normalize make it."""
    mean, std = torch.tensor(IMAGENET_MEAN, dtype=torch.float64), torch.tensor(IMAGENET_STD, dtype=torch.float64)
    return ((images.double() / 255 - mean) / std).permute(0, 3, 1, 2).to(images.device)


# float32: the pointer stem (IEEE float32 stays off the TMA forms); bfloat16: the TMA stem over space-to-depth cells.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_uint8_images_through_the_fused_stem_equal_normalize_then_eager(dtype):
    model = models.build("resnet18", seed=1, num_classes=10)
    fused = models.fuse(model, dtype=dtype, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD)
    images = torch.randint(0, 256, (1, 33, 41, 3), dtype=torch.uint8)  # odd sizes: half-filled cells at the border
    with torch.inference_mode():
        out = fused(images)
        ref = model.double()(normalize(images))
        float_out = fused(normalize(images).float())  # float32 NCHW input is taken as normalized already
    assert_relative_close(out, ref, TOLERANCES[dtype], what=f"uint8 images {dtype}")
    assert_relative_close(float_out, ref, TOLERANCES[dtype], what=f"normalized float32 images {dtype}")
    # One image: float32 must decide it; in bfloat16 the relative error above is the check, top-1 where decided.
    assert_same_top1(out, ref.float(), dtype, min_decided=1 if dtype == torch.float32 else 0)


def test_fuse_rejects_bad_normalization_and_images():
    model = models.build("digits_resnet")
    with pytest.raises(ValueError, match="input_mean and input_std"):
        models.fuse(model, input_mean=IMAGENET_MEAN)
    with pytest.raises(ValueError, match="3 values"):
        models.fuse(model, input_mean=(0.5, 0.5), input_std=(0.2, 0.2))
    with pytest.raises(ValueError, match="positive"):
        models.fuse(model, input_mean=IMAGENET_MEAN, input_std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="allow_tf32"):
        models.fuse(model, dtype=torch.float16, allow_tf32=True)
    images = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="input_mean"):
        models.fuse(model)(images)  # uint8 without normalization
    normalizing = models.fuse(model, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD)
    with pytest.raises(ValueError, match="NHWC"):
        normalizing(images.permute(0, 3, 1, 2).contiguous())


def test_form_table_rows_are_marked_unmeasured_and_cover_every_layer_kind():
    from models.conv_forms import FORM_TABLE, UNMEASURED, choose_form

    # No GPU has timed these choices yet: every row must say so until bench/gpu_check.sh has measured it.
    assert all(UNMEASURED in row.basis for row in FORM_TABLE)
    for kind in ("stem", "1x1", "1x1/2", "3x3"):
        for side in (1, 7, 14, 28, 56, 112):
            choose_form(kind, side)


@pytest.mark.parametrize(
    ("conv", "height", "expected"),
    [
        (torch.nn.Conv2d(16, 32, 1, bias=False), 6, "conv1x1_tma"),
        (torch.nn.Conv2d(16, 32, 1, stride=2, bias=False), 6, "conv_tma"),
        (torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), 28, "conv_tma"),  # a 28x28 map: boxes
        (torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), 14, "conv_bn_act"),  # 14x14: the pointer kernel
        (torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), 7, "conv_bn_act"),  # odd map at stride 2
        (torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), 28, "conv_bn_act"),  # C = 8: no 16-channel step
    ],
)
def test_fused_conv_runs_the_form_the_table_picks(conv, height, expected, monkeypatch):
    from models import conv_forms
    from models.fused import FusedConv

    bn = torch.nn.BatchNorm2d(conv.out_channels).eval()
    fused = FusedConv(conv.eval(), bn, torch.float16, relu=True)
    ran = []
    for name in ("conv1x1_tma", "conv_tma", "conv_bn_act"):
        original = getattr(conv_forms, name)
        monkeypatch.setattr(conv_forms, name, lambda *a, _f=original, _n=name, **k: ran.append(_n) or _f(*a, **k))
    x = torch.randn(1, conv.in_channels, height, height)
    with torch.inference_mode():
        out = fused(x.permute(0, 2, 3, 1).half().contiguous())
        ref = torch.relu(bn(conv(x.half().float()))).permute(0, 2, 3, 1)
    assert ran == [expected]
    assert_relative_close(out, ref, TOLERANCES[torch.float16], what=f"{expected} float16")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", ALL_ARCHS)
def test_fused_matches_eager_at_224_on_gpu(name, dtype, batch):
    # Among 1000 random-weight classes the top two are ~0.27 RMS logits apart on average, against a reach of 0.04 RMS:
    # most rows are decided in half precision, and a quarter at least must be (at batch 1 none: the parity bound is).
    check_model_parity(name, dtype, torch.randn(batch, 3, 224, 224, device="cuda"), min_decided=batch // 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_uint8_images_at_224_on_gpu(dtype):
    model = models.build("resnet50", seed=1).cuda()
    fused = models.fuse(model, dtype=dtype, input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD)
    images = torch.randint(0, 256, (4, 224, 224, 3), dtype=torch.uint8, device="cuda")
    with torch.inference_mode():
        out = fused(images)
        ref = model.double()(normalize(images))
    assert_relative_close(out, ref, TOLERANCES[dtype], what=f"uint8 resnet50 {dtype}")
