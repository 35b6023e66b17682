"""Backends: eager, onnxruntime and fused give the same logits; fused refuses where it cannot run."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import models
from models import digits
from service.backends import BackendUnavailableError, create_backend, resolve_backend_kind
from service.backends.fused import batch_buckets
from service.backends.onnx import export_onnx
from tests.support.numerics import CROSS_BACKEND_TOLERANCE, TF32_TOLERANCE, TOLERANCES
from tests.support.numerics import assert_relative_close as assert_close_logits

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def reference_logits(arch: str, x: torch.Tensor) -> torch.Tensor:
    """The plain model, float64, no backend involved: [n, 3, S, S] -> [n, classes]."""
    model = models.build(arch).double()
    with torch.no_grad():
        return model(x.double())


def digit_batch(n: int) -> torch.Tensor:
    """n real held-out digits through the training preprocessing: [n, 3, 32, 32]."""
    _, test = digits.load_split()
    return digits.preprocess_images(test.images[:n])


def assert_same_logits(out: torch.Tensor, ref: torch.Tensor, tolerance: float) -> None:
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.device.type == "cpu"
    assert_close_logits(out, ref, tolerance, what="logits [n, class]")
    torch.testing.assert_close(out.argmax(1), ref.argmax(1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "arch, input_size, inputs",
    [
        pytest.param("resnet18", 40, lambda: torch.randn(3, 3, 40, 40), id="resnet18-40px"),
        pytest.param("digits_resnet", 32, lambda: digit_batch(5), id="digits"),
    ],
)
def test_eager_and_onnxruntime_match_the_float64_model_and_each_other(arch, input_size, inputs):
    x = inputs()
    ref = reference_logits(arch, x)
    outputs = {}
    for kind in ("eager", "onnxruntime"):
        backend = create_backend(kind, models.build(arch), input_size=input_size, max_batch_size=8, device=CPU)
        assert backend.name == kind and backend.device == CPU and backend.dtype == torch.float32
        assert backend.preferred_batch_sizes == ()  # every batch size costs what its rows cost
        outputs[kind] = backend.run(x)
        assert_same_logits(outputs[kind], ref, CROSS_BACKEND_TOLERANCE)
        assert_same_logits(backend.run(x[1:2]), ref[1:2], CROSS_BACKEND_TOLERANCE)  # the batch axis is dynamic
    assert_same_logits(outputs["onnxruntime"], outputs["eager"].double(), CROSS_BACKEND_TOLERANCE)


def test_onnx_export_is_deterministic():
    assert export_onnx(models.build("digits_resnet"), 32) == export_onnx(models.build("digits_resnet"), 32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is the CPU one")
def test_fused_under_the_interpreter_predicts_like_eager():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it on CPU-only machines
    x = digit_batch(2)
    eager = create_backend("eager", models.build("digits_resnet"), input_size=32, max_batch_size=2, device=CPU)
    fused = create_backend("fused", models.build("digits_resnet"), input_size=32, max_batch_size=2, device=CPU)
    assert fused.name == "fused" and fused.device == CPU
    assert fused.preferred_batch_sizes == ()  # no CUDA graphs under the interpreter, so no buckets
    assert_same_logits(fused.run(x), eager.run(x).double(), CROSS_BACKEND_TOLERANCE)


def test_fused_translates_the_models_cannot_run_here_error(monkeypatch: pytest.MonkeyPatch):
    def unavailable(*args: object, **kwargs: object) -> None:
        raise models.FusedUnavailableError("no CUDA device here")

    monkeypatch.setattr(models, "fuse", unavailable)
    with pytest.raises(BackendUnavailableError, match=r"no CUDA device here.*--backend onnxruntime") as raised:
        create_backend("fused", models.build("digits_resnet"), input_size=32, max_batch_size=2, device=CPU)
    assert isinstance(raised.value.__cause__, models.FusedUnavailableError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fused runs on CUDA")
def test_fused_refuses_on_a_cpu_without_the_interpreter():
    # A fresh process: this one has the interpreter switched on by conftest.
    script = textwrap.dedent(
        """
        import models
        from service.backends import BackendUnavailableError, create_backend
        try:
            create_backend("fused", models.build("digits_resnet"), input_size=32, max_batch_size=2)
        except BackendUnavailableError as error:
            assert isinstance(error, RuntimeError)
            print(error)
        else:
            raise SystemExit("fused backend did not refuse")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "CUDA" in done.stdout and "TRITON_INTERPRET=1" in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, allow_tf32, bound",
    [
        (torch.float32, False, TF32_TOLERANCE),
        (torch.float32, True, TF32_TOLERANCE),
        (torch.float16, False, TOLERANCES[torch.float16]),
    ],
)
def test_fused_cuda_graphs_match_eager_for_every_batch_size(dtype, allow_tf32, bound):
    cuda = torch.device("cuda")
    fused = create_backend(
        "fused", models.build("resnet18"), input_size=64, max_batch_size=6, dtype=dtype, allow_tf32=allow_tf32,
        device=cuda,
    )  # fmt: skip
    assert fused.preferred_batch_sizes == (1, 2, 4, 6)  # the CUDA graphs' buckets
    x = torch.randn(6, 3, 64, 64)
    ref = reference_logits("resnet18", x)
    for n in (1, 3, 4, 6, 2):  # every bucket (1, 2, 4, 6), padded ones included, in no particular order
        assert_same_logits(fused.run(x[:n]), ref[:n], bound)


def test_resolve_backend_kind():
    assert resolve_backend_kind("auto") == ("fused" if torch.cuda.is_available() else "onnxruntime")
    assert resolve_backend_kind("eager") == "eager"
    with pytest.raises(ValueError, match="onnxruntime"):
        resolve_backend_kind("tensorrt")


def test_onnxruntime_refuses_half_precision():
    with pytest.raises(ValueError, match="float32"):
        create_backend("onnxruntime", models.build("digits_resnet"), input_size=32, max_batch_size=2, dtype=torch.half)


@pytest.mark.parametrize("kind", ["eager", "onnxruntime"])
def test_tf32_is_the_fused_backends_only(kind):
    with pytest.raises(ValueError, match="tf32 is a float32 mode of the fused backend only"):
        create_backend(kind, models.build("digits_resnet"), input_size=32, max_batch_size=2, allow_tf32=True)


@pytest.mark.parametrize(
    "max_batch_size, buckets", [(1, [1]), (2, [1, 2]), (8, [1, 2, 4, 8]), (24, [1, 2, 4, 8, 16, 24])]
)
def test_batch_buckets(max_batch_size, buckets):
    assert batch_buckets(max_batch_size) == buckets


def normalize(images: torch.Tensor, spec: models.InputSpec) -> torch.Tensor:
    """uint8 [n, S, S, 3] -> float64 [n, 3, S, S] as torchvision's ToTensor + Normalize make it."""
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).double() / 255 - mean) / std


# The fused backend runs under the Triton interpreter here: one small image keeps it to seconds.
@pytest.mark.parametrize(
    "kind, arch, size, rows",
    [("eager", "resnet18", 40, 3), ("onnxruntime", "resnet18", 40, 3), ("eager", "digits_resnet", 32, 2),
     ("onnxruntime", "digits_resnet", 32, 2), ("fused", "digits_resnet", 32, 1)],
)  # fmt: skip
def test_uint8_nhwc_images_equal_float32_normalize_then_the_model(kind, arch, size, rows):
    spec = models.input_spec(arch, size)
    backend = create_backend(
        kind, models.build(arch), input_size=size, max_batch_size=4, device=CPU, input_mean=spec.mean,
        input_std=spec.std,
    )  # fmt: skip
    images = torch.randint(0, 256, (rows, size, size, 3), dtype=torch.uint8)
    normalized = normalize(images, spec)
    reference = reference_logits(arch, normalized)
    assert_same_logits(backend.run(images), reference, CROSS_BACKEND_TOLERANCE)
    # The float32 NCHW layout still runs on the same backend, and agrees.
    assert_same_logits(backend.run(normalized.float()), reference, CROSS_BACKEND_TOLERANCE)


@pytest.mark.parametrize("kind", ["eager", "onnxruntime"])
def test_a_backend_without_mean_and_std_refuses_uint8_images(kind):
    backend = create_backend(kind, models.build("digits_resnet"), input_size=32, max_batch_size=2, device=CPU)
    with pytest.raises(ValueError, match="mean/std"):
        backend.run(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="together"):
        create_backend(kind, models.build("digits_resnet"), input_size=32, max_batch_size=2, input_mean=(0.5,) * 3)


@pytest.mark.gpu
def test_fused_cuda_graphs_of_both_layouts_match_their_references():
    spec = models.input_spec("resnet18", 64)
    fused = create_backend(
        "fused", models.build("resnet18"), input_size=64, max_batch_size=6, dtype=torch.bfloat16,
        device=torch.device("cuda"), input_mean=spec.mean, input_std=spec.std,
    )  # fmt: skip
    assert fused.preferred_batch_sizes == (1, 2, 4, 6)
    images = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8)
    reference = reference_logits("resnet18", normalize(images, spec))
    for n in (3, 1, 6, 2):  # padded buckets included, the two layouts interleaved: each has its own graphs
        assert_same_logits(fused.run(images[:n]), reference[:n], TOLERANCES[torch.bfloat16])
        assert_same_logits(fused.run(normalize(images[:n], spec).float()), reference[:n], TOLERANCES[torch.bfloat16])
