"""GET /v2/models/{m}/config: the part of Triton's model configuration that clients read before they infer.

perf_analyzer (and tritonclient's get_model_config) ask for it first: max_batch_size says whether the first dimension
is the batch, the tensors' dims exclude it. Built from the model's metadata (the servicer's ModelMetadata answer, so
readiness and errors are the gRPC path's) and its repository entry.

A bridge: once the gRPC ModelConfig RPC exists (issue 13's gRPC extensions), this JSON should be that RPC's message
rendered as Triton renders it, from one builder, instead of a second description of the same model.
"""

from typing import Any

from service._proto import grpc_service_pb2 as pb
from service.repository import ModelConfig


def model_config_json(metadata: pb.ModelMetadataResponse, config: ModelConfig) -> dict[str, Any]:
    def tensor(spec: pb.ModelMetadataResponse.TensorMetadata) -> dict[str, Any]:
        return {"name": spec.name, "data_type": f"TYPE_{spec.datatype}", "dims": list(spec.shape[1:])}

    return {
        "name": metadata.name,
        "platform": metadata.platform,
        "backend": metadata.platform,
        "max_batch_size": config.max_batch_size,
        "input": [tensor(spec) for spec in metadata.inputs],
        "output": [tensor(spec) for spec in metadata.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": config.max_queue_delay_us},
    }
