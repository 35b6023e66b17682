"""Parsing the model repository TOML (contract 5), the packaged default repository, and class labels."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.precision import PRECISIONS
from service.batch_plan import BucketPolicy
from service.input_layout import AdvertisedInput
from service.labels import load_labels
from service.repository import DEFAULT_REPOSITORY, ModelConfig, RepositoryError, load_repository
from tests.support.server import REPO_ROOT


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "repo" / "models.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_contract_example_and_defaults(tmp_path: Path):
    path = _write(
        tmp_path,
        """
        [models.resnet50]
        arch = "resnet50"
        weights = "pretrained"
        labels = "imagenet"
        input_size = 224
        max_batch_size = 32
        max_queue_delay_us = 2000

        [models.small]
        arch = "resnet18"
        weights = "weights/small.pt"
        labels = "small_labels.txt"
        input_size = 40
        num_classes = 7
        seed = 3
        backend = "eager"
        max_queue_size = 5
        dtype = "float16"
        """,
    )
    resnet50, small = load_repository(path)
    assert resnet50 == ModelConfig(
        name="resnet50", arch="resnet50", weights="pretrained", labels="imagenet", input_size=224,
        max_batch_size=32, max_queue_delay_us=2000,
    )  # fmt: skip
    assert resnet50.backend is None and resnet50.max_queue_size is None  # the server's flags decide
    # Relative paths are relative to the repository file, not to the working directory.
    assert small.weights == str(path.parent / "weights" / "small.pt")
    assert small.labels == str(path.parent / "small_labels.txt")
    assert (small.input_size, small.num_classes, small.seed, small.backend, small.max_queue_size) == (
        40,
        7,
        3,
        "eager",
        5,
    )
    assert small.precision == PRECISIONS["float16"] and small.precision.dtype == torch.float16  # parsed here, once


@pytest.mark.parametrize("dtype", ["float32", "tf32", "float16", "bfloat16"])
def test_dtype_is_parsed_into_a_precision(tmp_path: Path, dtype: str):
    (config,) = load_repository(_write(tmp_path, f'[models.m]\narch = "resnet18"\ndtype = "{dtype}"\n'))
    assert config.precision.name == dtype
    assert config.precision.allow_tf32 == (dtype == "tf32")


@pytest.mark.parametrize("policy", list(BucketPolicy))
def test_bucket_policy_is_parsed_and_defaults_to_cost(tmp_path: Path, policy: BucketPolicy):
    (config,) = load_repository(_write(tmp_path, f'[models.m]\narch = "resnet18"\nbucket_policy = "{policy}"\n'))
    assert config.bucket_policy is policy
    (default,) = load_repository(_write(tmp_path, '[models.m]\narch = "resnet18"\n'))
    assert default.bucket_policy is BucketPolicy.COST


@pytest.mark.parametrize("advertised", list(AdvertisedInput))
def test_advertised_input_is_parsed_and_defaults_to_fp32_nchw(tmp_path: Path, advertised: AdvertisedInput):
    (config,) = load_repository(_write(tmp_path, f'[models.m]\narch = "resnet18"\nadvertised_input = "{advertised}"\n'))
    assert config.advertised_input is advertised
    (default,) = load_repository(_write(tmp_path, '[models.m]\narch = "resnet18"\n'))
    assert default.advertised_input is AdvertisedInput.FP32_NCHW


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('weights = "random"', "'arch' is required"),
        ('arch = "resnet19"', "unknown arch 'resnet19'"),
        ('arch = "resnet18"\nbatch_size = 4', "unknown keys ['batch_size']"),
        ('arch = "resnet18"\nmax_batch_size = 0', "max_batch_size must be an integer >= 1"),
        ('arch = "resnet18"\nmax_batch_size = true', "max_batch_size must be an integer >= 1"),
        ('arch = "resnet18"\ninput_size = "224"', "input_size must be an integer >= 1"),
        ('arch = "resnet18"\nmax_queue_delay_us = -1', "max_queue_delay_us must be an integer >= 0"),
        ('arch = "resnet18"\nmax_queue_size = 0', "max_queue_size must be an integer >= 1"),
        ('arch = "resnet18"\nweights = 3', "weights must be a string"),
        ('arch = "resnet18"\nbackend = "tensorrt"', "backend must be one of"),
        ('arch = "resnet18"\ndtype = "int8"', "dtype must be one of"),
        ('arch = "resnet18"\nbucket_policy = "greedy"', "bucket_policy must be one of pad, fill, cost, got 'greedy'"),
        (
            'arch = "resnet18"\nadvertised_input = "uint8_nchw"',
            "advertised_input must be one of fp32_nchw, uint8_nhwc, got 'uint8_nchw'",
        ),
        ('arch = "resnet18"\nadvertised_input = 8', "advertised_input must be a string, got 8"),
        ('arch = "resnet18"\nmax_batch_size = -4', "max_batch_size must be an integer >= 1, got -4"),
        ('arch = "resnet18"\ninput_size = 0', "input_size must be an integer >= 1, got 0"),
        ('arch = "resnet18"\nrequired = "yes"', "required must be true or false, got 'yes'"),
        ('arch = "resnet18"\nrequired = 1', "required must be true or false, got 1"),
    ],
)
def test_bad_model_tables_are_refused_naming_the_file_the_table_and_the_key(tmp_path: Path, table: str, message: str):
    path = _write(tmp_path, f"[models.m]\n{table}\n")
    with pytest.raises(RepositoryError) as raised:
        load_repository(path)
    assert str(raised.value).startswith(f"{path}: [models.m]: ")
    assert message in str(raised.value)


def test_required_defaults_to_false(tmp_path: Path):
    path = _write(tmp_path, '[models.a]\narch = "resnet18"\n[models.b]\narch = "resnet18"\nrequired = true\n')
    assert [config.required for config in load_repository(path)] == [False, True]


def test_the_server_refuses_to_start_with_one_clear_log_line(tmp_path: Path):
    path = _write(tmp_path, '[models.m]\narch = "resnet18"\nmax_batch_size = -1\n')
    completed = subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "0", "--model-repository", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 1
    lines = (completed.stdout + completed.stderr).splitlines()
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in completed.stderr, lines
    assert f"{path}: [models.m]: max_batch_size must be an integer >= 1, got -1" in errors[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no models"),
        ("[models]\n", "no models"),
        ('[model.x]\narch = "resnet18"\n', "unknown top-level keys ['model']"),
        ('[models."bad name"]\narch = "resnet18"\n', "a model name is"),
        ("[models.x\n", "not valid TOML"),
    ],
)
def test_bad_repository_files_are_refused(tmp_path: Path, text: str, message: str):
    with pytest.raises(RepositoryError) as raised:
        load_repository(_write(tmp_path, text))
    assert message in str(raised.value)


def test_missing_repository_file(tmp_path: Path):
    with pytest.raises(RepositoryError, match="cannot read"):
        load_repository(tmp_path / "absent.toml")


def test_default_repository_serves_digits_and_resnet50():
    configs = {config.name: config for config in load_repository(DEFAULT_REPOSITORY)}
    assert set(configs) == {"digits_resnet", "resnet50"}
    assert configs["digits_resnet"].required and not configs["resnet50"].required
    assert configs["digits_resnet"].weights == "pretrained" and configs["digits_resnet"].input_size == 32
    assert configs["resnet50"].weights == "pretrained" and configs["resnet50"].labels == "imagenet"


def test_labels_from_imagenet_a_file_or_indices(tmp_path: Path):
    imagenet = load_labels("imagenet", 1000)
    assert len(imagenet) == 1000 and imagenet[0] == "tench" and len(set(imagenet)) > 990
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\nbird\n")
    assert load_labels(str(path), 3) == ["cat", "dog", "bird"]
    with pytest.raises(ValueError, match="has 3 lines but the model has 4 classes"):
        load_labels(str(path), 4)
    assert load_labels(None, 3) == ["0", "1", "2"]
