"""The builders of Triton's messages (service/servicers/kserve_messages.py), in process: what a GPU model's config
says, the index in every lifecycle state, statistics, classification ties; and ServerMetadata's version from a
checkout. End to end: test_triton_extensions.py.
"""

import importlib.metadata
import tomllib
from types import SimpleNamespace

import numpy as np
import torch

from models import digits
from models.precision import FLOAT32
from service._proto import model_config_pb2 as mc
from service.input_layout import AdvertisedInput
from service.lifecycle import Draining, Failed, Loaded, Loading, ModelState, OutputSpec, Ready, ServedModel, Unloaded
from service.repository import ModelConfig
from service.servicers import kserve
from service.servicers.kserve_messages import (
    classification_output,
    model_config,
    model_metadata,
    model_statistics,
    repository_index,
)
from service.statistics import InferenceStatistics, RequestTimes
from tests.support.server import REPO_ROOT

BACKEND = SimpleNamespace(name="fused", device=torch.device("cuda", 1), preferred_batch_sizes=(1, 8, 32))
LOADED = Loaded("m", FLOAT32, BACKEND, None, digits.INPUT, OutputSpec(("zero", "one", "two")))


def served(name: str, state: ModelState, **config) -> ServedModel:
    return ServedModel(ModelConfig(name=name, arch="digits_resnet", **config), "fused", max_queue_size=7, state=state)


def test_a_gpu_models_config():
    config = model_config(served("m", Ready(LOADED), max_batch_size=32, max_queue_delay_us=500), LOADED)
    assert (config.name, config.platform, config.backend, config.max_batch_size) == ("m", "fused", "fused", 32)
    (model_input,), (model_output,) = config.input, config.output
    assert list(model_input.dims) == [3, digits.INPUT_SIZE, digits.INPUT_SIZE] and model_input.data_type == mc.TYPE_FP32
    assert list(model_output.dims) == [3] and model_output.data_type == mc.TYPE_FP32
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [1, 8, 32] and batching.max_queue_delay_microseconds == 500
    assert batching.default_queue_policy.max_queue_size == 7
    (group,) = config.instance_group
    assert (group.kind, list(group.gpus), group.count) == (mc.ModelInstanceGroup.KIND_GPU, [1], 1)


def test_the_advertised_input_layout_reaches_metadata_and_config():
    size = digits.INPUT_SIZE
    expected = {
        AdvertisedInput.FP32_NCHW: ("FP32", mc.TYPE_FP32, mc.ModelInput.FORMAT_NCHW, [3, size, size]),
        AdvertisedInput.UINT8_NHWC: ("UINT8", mc.TYPE_UINT8, mc.ModelInput.FORMAT_NHWC, [size, size, 3]),
    }
    for advertised, (datatype, config_type, config_format, dims) in expected.items():
        model = served("m", Ready(LOADED), advertised_input=advertised)
        (metadata_input,) = model_metadata(model, LOADED).inputs
        assert (metadata_input.name, metadata_input.datatype, list(metadata_input.shape)) == (
            "input",
            datatype,
            [-1, *dims],
        )
        (config_input,) = model_config(model, LOADED).input
        assert (config_input.data_type, config_input.format, list(config_input.dims)) == (
            config_type,
            config_format,
            dims,
        )
    (metadata_output,) = model_metadata(served("m", Ready(LOADED)), LOADED).outputs
    assert (metadata_output.datatype, list(metadata_output.shape)) == ("FP32", [-1, 3])


def test_the_index_names_every_state_as_triton_does():
    models = [
        served("loading", Loading()),
        served("ready", Ready(LOADED)),
        served("draining", Draining(LOADED)),
        served("failed", Failed("OSError: gone")),
        served("unloaded", Unloaded()),
    ]
    index = repository_index(models, ready_only=False).models
    assert [(entry.name, entry.state, entry.reason) for entry in index] == [
        ("loading", "LOADING", "loading"),
        ("ready", "READY", ""),
        ("draining", "UNLOADING", "draining"),
        ("failed", "UNAVAILABLE", "OSError: gone"),
        ("unloaded", "UNAVAILABLE", "unloaded"),
    ]
    assert [entry.name for entry in repository_index(models, ready_only=True).models] == ["ready"]


def test_statistics_sum_requests_and_group_batches_by_size():
    statistics = InferenceStatistics()
    stats = statistics.of("m")
    on_batch = statistics.batch_observer("m")
    for size, compute_us in ((4, 10), (1, 3), (4, 20)):
        on_batch(size, 0, compute_us)
    stats.record_success(
        3, 900, RequestTimes(queue_ns=100, compute_input_ns=20, compute_infer_ns=700, compute_output_ns=5)
    )
    stats.record_failure(50)
    message = model_statistics("m", stats)
    assert (message.inference_count, message.execution_count) == (3, 3) and message.last_inference > 0
    inference = message.inference_stats
    assert (inference.success.count, inference.success.ns, inference.fail.count, inference.fail.ns) == (1, 900, 1, 50)
    assert (inference.queue.ns, inference.compute_input.ns, inference.compute_infer.ns) == (100, 20, 700)
    batches = [(batch.batch_size, batch.compute_infer.count, batch.compute_infer.ns) for batch in message.batch_stats]
    assert batches == [(1, 1, 3000), (4, 2, 30000)]


def test_classification_breaks_ties_by_the_lower_index_and_frames_each_string():
    logits = np.array([[0.5, 2.0, 2.0], [-1.0, -3.0, 0.25]], dtype=np.float32)
    tensor, raw = classification_output(logits, 2, ("zero", "one", "two"))
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [2, 2])
    strings = [b"2.000000:1:one", b"2.000000:2:two", b"0.250000:2:two", b"-1.000000:0:zero"]
    assert raw == b"".join(len(text).to_bytes(4, "little") + text for text in strings)


def test_server_version_from_a_checkout_that_is_not_installed(monkeypatch):
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    kserve.server_version.cache_clear()
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    try:
        pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
        assert kserve.server_version() == pyproject["project"]["version"]
    finally:
        kserve.server_version.cache_clear()
