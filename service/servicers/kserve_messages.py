"""Triton's model configuration, statistics, repository index and classification output, built from our models.

Plain functions (model -> protobuf message) so that every frontend answers alike: the gRPC servicer returns these
messages, an HTTP/REST frontend renders them with google.protobuf.json_format.
"""

from collections.abc import Iterable, Sequence

import numpy as np

from service._proto import grpc_service_pb2 as pb
from service._proto import model_config_pb2 as mc
from service.input_layout import AdvertisedInput
from service.lifecycle import Draining, Failed, Loaded, Loading, ModelState, Ready, ServedModel, Unloaded
from service.statistics import Duration, ModelStats
from service.tensor_input import INPUT_NAME

MODEL_VERSION = "1"
_CONFIG_TYPES = {AdvertisedInput.FP32_NCHW: mc.TYPE_FP32, AdvertisedInput.UINT8_NHWC: mc.TYPE_UINT8}
_CONFIG_FORMATS = {
    AdvertisedInput.FP32_NCHW: mc.ModelInput.FORMAT_NCHW,
    AdvertisedInput.UINT8_NHWC: mc.ModelInput.FORMAT_NHWC,
}
OUTPUT_NAME = "logits"
# The state names of Triton's repository index.
_INDEX_STATE: dict[type[ModelState], str] = {
    Loading: "LOADING",
    Ready: "READY",
    Draining: "UNLOADING",
    Failed: "UNAVAILABLE",
    Unloaded: "UNAVAILABLE",
}


def model_metadata(served: ServedModel, loaded: Loaded) -> pb.ModelMetadataResponse:
    """Triton's ModelMetadata: the input in the layout the repository advertises, batch dimension -1."""
    advertised = served.config.advertised_input
    return pb.ModelMetadataResponse(
        name=served.name,
        versions=[MODEL_VERSION],
        platform=loaded.backend.name,
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=INPUT_NAME,
                datatype=advertised.datatype,
                shape=[-1, *advertised.dims(loaded.preprocessing.input_size)],
            )
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(
                name=OUTPUT_NAME, datatype="FP32", shape=[-1, loaded.output.num_classes]
            )
        ],
    )


def model_config(served: ServedModel, loaded: Loaded) -> mc.ModelConfig:
    """The model's configuration as Triton's ModelConfig. With max_batch_size > 0, Triton's dims leave out the batch
    dimension: the input is [3, S, S] (FP32 NCHW) or [S, S, 3] (UINT8 NHWC, as advertised) and the output [classes],
    as perf_analyzer expects."""
    advertised = served.config.advertised_input
    device = loaded.backend.device
    on_gpu = device.type == "cuda"
    return mc.ModelConfig(
        name=served.name,
        platform=loaded.backend.name,
        backend=loaded.backend.name,
        max_batch_size=served.config.max_batch_size,
        input=[
            mc.ModelInput(
                name=INPUT_NAME,
                data_type=_CONFIG_TYPES[advertised],
                format=_CONFIG_FORMATS[advertised],
                dims=advertised.dims(loaded.preprocessing.input_size),
            )
        ],
        output=[mc.ModelOutput(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[loaded.output.num_classes])],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=list(loaded.backend.preferred_batch_sizes),
            max_queue_delay_microseconds=served.config.max_queue_delay_us,
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=served.max_queue_size),
        ),
        # One backend instance per model, on its device.
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{served.name}_0",
                kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU,
                count=1,
                gpus=[device.index or 0] if on_gpu else [],
            )
        ],
    )


def model_statistics(name: str, stats: ModelStats) -> pb.ModelStatistics:
    """Triton's ModelStatistics for one model. Batch statistics carry compute_infer only: the input and output of a
    request are made per request (they are in inference_stats), not per batch."""
    return pb.ModelStatistics(
        name=name,
        version=MODEL_VERSION,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(times.compute_infer))
            for size, times in sorted(stats.batches.items())
        ],
    )


def repository_index(models: Iterable[ServedModel], *, ready_only: bool) -> pb.RepositoryIndexResponse:
    """Every model of the repository (only the ready ones when `ready_only`), with Triton's state names."""
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=model.name, version=MODEL_VERSION, state=_INDEX_STATE[type(model.state)], reason=model.reason
            )
            for model in models
            if model.ready or not ready_only
        ]
    )


def classification_output(
    logits: np.ndarray, class_count: int, labels: Sequence[str]
) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """Triton's classification extension: the top `class_count` classes of each row of `logits` [n, classes], best
    first, as BYTES [n, class_count] of "score:index:label" (score as C's %f), and the raw contents: each string
    behind its 4-byte little-endian length."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :class_count]
    raw = bytearray()
    for row, indices in zip(logits, top, strict=True):
        for index in indices:
            text = f"{row[index]:f}:{index}:{labels[index]}".encode()
            raw += len(text).to_bytes(4, "little") + text
    tensor = pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype="BYTES", shape=top.shape)
    return tensor, bytes(raw)


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)
