"""Talks to our server with NVIDIA's tritonclient[http], unchanged, in a process of its own (as its gRPC twin
tritonclient_probe.py does: tritonclient's packages stay out of the test process).

Usage: python tests/support/tritonclient_http_probe.py HOST:PORT INPUTS.npz OUTPUTS.npz
INPUTS.npz holds arrays named "<model>:<n>". Each is inferred several ways (JSON or binary input, JSON or binary output,
async_infer, the asyncio client); the logits go to OUTPUTS.npz as "<name>|<way>". Liveness, readiness, metadata, the
extensions (repository index, statistics, unload then load, classification with class_count=3 on the first array)
are printed as JSON.
"""

import asyncio
import json
import sys

import numpy as np
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient

_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16"}


def request(array: np.ndarray, binary_input: bool, binary_output: bool, client_module=httpclient):
    infer_input = client_module.InferInput("input", list(array.shape), _DATATYPES[array.dtype])
    infer_input.set_data_from_numpy(array, binary_data=binary_input)
    return [infer_input], [client_module.InferRequestedOutput("logits", binary_data=binary_output)]


async def aio_logits(url: str, model: str, array: np.ndarray) -> np.ndarray:
    client = aioclient.InferenceServerClient(url)
    try:
        inputs, outputs = request(array, True, True, aioclient)
        return (await client.infer(model, inputs, outputs=outputs)).as_numpy("logits")
    finally:
        await client.close()


def extensions(client: httpclient.InferenceServerClient, model: str, array: np.ndarray) -> dict:
    index = client.get_model_repository_index()
    stats = client.get_inference_statistics(model)
    client.unload_model(model)
    unloaded_ready = client.is_model_ready(model)
    client.load_model(model)
    infer_input = httpclient.InferInput("input", list(array.shape), _DATATYPES[array.dtype])
    infer_input.set_data_from_numpy(array)
    top = httpclient.InferRequestedOutput("logits", binary_data=True, class_count=3)
    classes = client.infer(model, [infer_input], outputs=[top]).as_numpy("logits")
    return {
        "index": index,
        "stats": stats,
        "unloaded_ready": unloaded_ready,
        "reloaded_ready": client.is_model_ready(model),
        "classification": [[entry.decode() for entry in row] for row in classes],
    }


def main(url: str, inputs_path: str, outputs_path: str) -> None:
    client = httpclient.InferenceServerClient(url, concurrency=2)
    arrays = dict(np.load(inputs_path))
    models = sorted({key.split(":")[0] for key in arrays})
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(),
        "models": {
            model: {
                "ready": client.is_model_ready(model),
                "metadata": client.get_model_metadata(model),
                "config": client.get_model_config(model),
            }
            for model in models
        },
    }
    outputs = {}
    for key, array in arrays.items():
        model = key.split(":")[0]
        for binary_input in (False, True):
            for binary_output in (False, True):
                inputs, requested = request(array, binary_input, binary_output)
                result = client.infer(model, inputs, outputs=requested)
                outputs[
                    f"{key}|in-{'binary' if binary_input else 'json'}-out-{'binary' if binary_output else 'json'}"
                ] = result.as_numpy("logits")
        inputs, requested = request(array, True, True)
        outputs[f"{key}|async_infer"] = (
            client.async_infer(model, inputs, outputs=requested).get_result().as_numpy("logits")
        )
        outputs[f"{key}|aio"] = asyncio.run(aio_logits(url, model, array))
    first = min(key for key in arrays if key.startswith(f"{models[0]}:"))
    report["extensions"] = extensions(client, models[0], arrays[first])
    client.close()
    np.savez(outputs_path, **outputs)
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
