"""Calls Triton's gRPC extensions on our server with NVIDIA's tritonclient[grpc], unchanged, in a process of its own.

tritonclient registers the protobuf package `inference` too, so it never shares a process with our stubs
(docs/ARCHITECTURE.md, "Pitfalls"). Usage: python tests/support/tritonclient_extensions_probe.py ADDRESS MODEL SPARE
INPUTS.npy. MODEL is served throughout; SPARE is unloaded and loaded again. Prints what each call answered as JSON.
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

TIMEOUT_S = 60


def _input(array: np.ndarray) -> grpcclient.InferInput:
    infer_input = grpcclient.InferInput("input", list(array.shape), "FP32")
    infer_input.set_data_from_numpy(array)
    return infer_input


def _stream(client: grpcclient.InferenceServerClient, model: str, array: np.ndarray) -> list[dict]:
    """Three requests on one stream, the second for a model that does not exist: each answered, in any order."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request_id, name in (("first", model), ("bad", "no_such_model"), ("third", model)):
            client.async_stream_infer(name, [_input(array)], request_id=request_id)
        results = [answers.get(timeout=TIMEOUT_S) for _ in range(3)]
    finally:
        client.stop_stream()
    return [
        {"error": str(error)}
        if error is not None
        else {"id": result.get_response().id, "logits": result.as_numpy("logits").tolist()}
        for result, error in results
    ]


def _error_of(call) -> str:
    try:
        call()
    except InferenceServerException as error:
        return str(error)
    return ""


def main(address: str, model: str, spare: str, inputs_path: str) -> None:
    array = np.load(inputs_path)
    client = grpcclient.InferenceServerClient(address)
    classified = client.infer(
        model, [_input(array)], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)]
    ).as_numpy("logits")
    report = {
        "server": client.get_server_metadata(as_json=True),
        "config": client.get_model_config(model, as_json=True),
        "index": client.get_model_repository_index(as_json=True),
        "classification": [[item.decode() for item in row] for row in classified],
        "logits": client.infer(model, [_input(array)]).as_numpy("logits").tolist(),
        "stream": _stream(client, model, array),
        "statistics": client.get_inference_statistics(model, as_json=True),
    }
    client.unload_model(spare)
    report["spare_ready_after_unload"] = client.is_model_ready(spare)
    report["spare_infer_after_unload"] = _error_of(lambda: client.infer(spare, [_input(array)]))
    client.load_model(spare)
    report["spare_ready_after_load"] = client.is_model_ready(spare)
    report["spare_logits_after_load"] = client.infer(spare, [_input(array)]).as_numpy("logits").tolist()
    report["load_unknown"] = _error_of(lambda: client.load_model("no_such_model"))
    report["shared_memory"] = _error_of(lambda: client.get_system_shared_memory_status())
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
