"""Talks to our server with NVIDIA's tritonclient[grpc], unchanged, in a process of its own.

tritonclient registers the protobuf package `inference` too, so it must never share a process with our stubs
(docs/ARCHITECTURE.md, "Pitfalls"). Usage: python tests/support/tritonclient_probe.py ADDRESS INPUTS.npz OUTPUTS.npz
INPUTS.npz holds arrays named "<model>:<n>"; their logits go to OUTPUTS.npz under the same names, and the checks'
results (liveness, readiness, metadata) are printed as JSON.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient

_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16"}


def main(address: str, inputs_path: str, outputs_path: str) -> None:
    client = grpcclient.InferenceServerClient(address)
    arrays = dict(np.load(inputs_path))
    models = sorted({key.split(":")[0] for key in arrays})
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata(as_json=True),
        "models": {
            model: {"ready": client.is_model_ready(model), "metadata": client.get_model_metadata(model, as_json=True)}
            for model in models
        },
    }
    outputs = {}
    for key, array in arrays.items():
        infer_input = grpcclient.InferInput("input", list(array.shape), _DATATYPES[array.dtype])
        infer_input.set_data_from_numpy(array)
        result = client.infer(key.split(":")[0], [infer_input], outputs=[grpcclient.InferRequestedOutput("logits")])
        outputs[key] = result.as_numpy("logits")
    np.savez(outputs_path, **outputs)
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
