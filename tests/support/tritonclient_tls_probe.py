"""Calls our server with NVIDIA's tritonclient[grpc] over mutual TLS, configured as its documentation says, in a
process of its own (tritonclient registers the protobuf package `inference` too: docs/ARCHITECTURE.md, "Pitfalls").

Usage: python tests/support/tritonclient_tls_probe.py ADDRESS CA.pem CLIENT.pem CLIENT-KEY.pem TOKEN. Prints JSON:
the status a readiness call without the token got, and the shape of the logits of one inference with it.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(address: str, ca: str, cert: str, key: str, token: str) -> None:
    client = grpcclient.InferenceServerClient(
        address, ssl=True, root_certificates=ca, private_key=key, certificate_chain=cert
    )
    try:
        client.is_server_ready()
        without_token = "OK"
    except InferenceServerException as error:
        without_token = error.status()
    infer_input = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
    infer_input.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    result = client.infer("digits", [infer_input], headers={"authorization": f"Bearer {token}"}, client_timeout=30)
    print(json.dumps({"without_token": without_token, "logits_shape": list(result.as_numpy("logits").shape)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
