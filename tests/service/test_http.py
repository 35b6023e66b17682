"""KServe v2 over HTTP/REST end to end: `python -m service` on 127.0.0.1, called with JSON and with Triton's binary
tensor extension; eager PyTorch in this process is the reference. Bad requests get Triton's status and a JSON error,
and the next good request still succeeds."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models import digits
from tests.support.kserve_http import HEADER_LENGTH, HttpAnswer, call, infer_body, split_response
from tests.support.numerics import CROSS_BACKEND_TOLERANCE, assert_relative_close
from tests.support.server import CPU_ONLY, ServerProcess, serving, start_server, write_repository

MAX_MESSAGE_BYTES = 200_000
SIZE = digits.INPUT_SIZE
MAX_BATCH = 4
_DIGITS = {"arch": "digits_resnet", "weights": "pretrained", "input_size": SIZE}
REPOSITORY = {
    "digits": {**_DIGITS, "backend": "eager", "max_batch_size": MAX_BATCH, "max_queue_delay_us": 500},
    "missing_weights": {**_DIGITS, "weights": "absent.pt", "backend": "eager"},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    directory = tmp_path_factory.mktemp("http")
    repository = write_repository(directory / "models.toml", REPOSITORY)
    limit = ("--max-message-bytes", str(MAX_MESSAGE_BYTES))
    with serving(directory, *limit, repository=repository, env=CPU_ONLY) as running:
        yield running


@pytest.fixture(scope="module")
def eager() -> torch.nn.Module:
    return models.build("digits_resnet", "pretrained")


def random_inputs(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, SIZE, SIZE), dtype=np.float32)


def reference(eager: torch.nn.Module, inputs: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return eager(torch.from_numpy(inputs.astype(np.float32)))


def json_input(array: np.ndarray, datatype: str = "FP32", nested: bool = False) -> dict:
    data = array.tolist() if nested else array.ravel().tolist()
    return {"name": "input", "datatype": datatype, "shape": list(array.shape), "data": data}


def binary_input(array: np.ndarray, datatype: str = "FP32") -> dict:
    size = array.nbytes
    return {"name": "input", "datatype": datatype, "shape": list(array.shape), "parameters": {"binary_data_size": size}}


def infer(server: ServerProcess, body: bytes, headers: dict[str, str], model: str = "digits") -> HttpAnswer:
    return call(f"{server.http_url}/v2/models/{model}/infer", body, headers)


def logits_of(answer: HttpAnswer) -> np.ndarray:
    assert answer.status == 200, answer.body
    header, binary = split_response(answer)
    (output,) = header["outputs"]
    assert (output["name"], output["datatype"]) == ("logits", "FP32")
    if "data" in output:
        assert not binary
        values = np.asarray(output["data"], dtype=np.float32)
    else:
        assert output["parameters"]["binary_data_size"] == len(binary)
        values = np.frombuffer(binary, dtype="<f4").copy()
    return values.reshape(output["shape"])


def test_health_metadata_and_readiness(server: ServerProcess):
    base = server.http_url
    assert call(f"{base}/v2/health/live").status == 200
    assert call(f"{base}/v2/health/ready").status == 200
    extensions = ["classification", "model_configuration", "model_repository", "statistics"]
    assert call(f"{base}/v2").json() == {"name": "fused-resnet", "version": "0.1.0", "extensions": extensions}
    metadata = {
        "name": "digits", "versions": ["1"], "platform": "eager",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }  # fmt: skip
    assert call(f"{base}/v2/models/digits").json() == metadata
    assert call(f"{base}/v2/models/digits/versions/1").json() == metadata
    assert call(f"{base}/v2/models/digits/ready").status == 200
    assert call(f"{base}/v2/models/digits/versions/1/ready").status == 200
    config = call(f"{base}/v2/models/digits/config").json()
    assert (config["max_batch_size"], config["input"][0]["dims"]) == (MAX_BATCH, [3, SIZE, SIZE])
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]

    not_ready = call(f"{base}/v2/models/missing_weights/ready")
    assert not_ready.status == 400 and "not ready" in not_ready.error()
    metadata_not_ready = call(f"{base}/v2/models/missing_weights")
    assert metadata_not_ready.status == 503 and "absent.pt" in metadata_not_ready.error()
    unknown = call(f"{base}/v2/models/nope/ready")
    assert unknown.status == 404 and "no model named 'nope'" in unknown.error()
    assert call(f"{base}/v2/models/digits/versions/2").status == 404


def test_statistics_and_repository_control(server: ServerProcess, eager: torch.nn.Module):
    base = server.http_url
    before = call(f"{base}/v2/models/digits/stats").json()["model_stats"][0]["inference_stats"]
    body, headers = infer_body([json_input(random_inputs(2))])
    assert infer(server, body, headers).status == 200
    (stats,) = call(f"{base}/v2/models/digits/versions/1/stats").json()["model_stats"]
    # 64-bit counters as JSON numbers, as Triton writes them (json_format would write strings).
    assert stats["inference_stats"]["success"]["count"] == before.get("success", {}).get("count", 0) + 1
    assert stats["inference_count"] >= 2 and isinstance(stats["inference_count"], int)
    every = {model["name"] for model in call(f"{base}/v2/models/stats").json()["model_stats"]}
    assert every == {"digits", "missing_weights"}

    index = call(f"{base}/v2/repository/index", b"").json()
    assert {(m["name"], m["state"]) for m in index} >= {("digits", "READY")}
    ready_only = call(f"{base}/v2/repository/index", json.dumps({"ready": True}).encode()).json()
    assert [m["name"] for m in ready_only] == ["digits"]

    assert call(f"{base}/v2/repository/models/digits/unload", b"").status == 200
    unloaded = infer(server, body, headers)
    assert unloaded.status == 503 and "digits" in unloaded.error()
    assert call(f"{base}/v2/repository/models/digits/load", b"{}").status == 200
    assert_relative_close(
        torch.from_numpy(logits_of(infer(server, body, headers))),
        reference(eager, random_inputs(2)),
        CROSS_BACKEND_TOLERANCE,
        what="digits after an HTTP unload and load",
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/nope/stats", None, 404, "nope"),
        ("/v2/repository/models/nope/load", b"", 404, "nope"),
        ("/v2/repository/index", b"[1]", 400, "JSON object"),
        ("/v2/repository/index", b"{not json", 400, "not JSON"),
        ("/v2/repository/index", b'{"ready": "yes"}', 400, "'ready' must be bool"),
        ("/v2/repository/models/digits/load", b'{"parameters": {"config": "{}"}}', 400, "['config'] are not supported"),
        ("/v2/repository/models/digits/unload", b'{"parameters": {"x": [1]}}', 400, "must be a bool, an integer"),
        ("/v2/repository/models/digits/unload", b'{"parameters": {"force": true}}', 400, "['force'] are not supported"),
        ("/v2/repository/models/digits/unload", b'{"parameters": 3}', 400, "'parameters' must be dict"),
    ],
)
def test_bad_statistics_and_repository_calls(server: ServerProcess, path, body, status, message):
    answer = call(server.http_url + path, body)
    assert answer.status == status and message in answer.error(), answer.body
    assert call(f"{server.http_url}/v2/models/digits/ready").status == 200


@pytest.mark.parametrize("output_binary", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("input_form", ["json", "json-nested", "binary"])
def test_infer_matches_eager(server: ServerProcess, eager: torch.nn.Module, input_form: str, output_binary: bool):
    inputs = random_inputs(3, seed=len(input_form))
    fields = {"id": "req-7", "outputs": [{"name": "logits", "parameters": {"binary_data": output_binary}}]}
    if input_form == "binary":
        body, headers = infer_body([binary_input(inputs)], [inputs.tobytes()], **fields)
    else:
        body, headers = infer_body([json_input(inputs, nested=input_form == "json-nested")], **fields)
    answer = infer(server, body, headers)
    header, binary = split_response(answer)
    assert (header["model_name"], header["model_version"], header["id"]) == ("digits", "1", "req-7")
    assert bool(binary) == output_binary and (HEADER_LENGTH in answer.headers) == output_binary
    assert_relative_close(logits_of(answer), reference(eager, inputs), CROSS_BACKEND_TOLERANCE, what=input_form)


@pytest.mark.parametrize("input_form", ["json", "binary"])
def test_fp16_inputs_and_binary_data_output(server: ServerProcess, eager: torch.nn.Module, input_form: str):
    # FP16 is widened to float32 exactly, so the reference is eager on the rounded values.
    inputs = random_inputs(2, seed=16).astype(np.float16)
    fields = {"parameters": {"binary_data_output": True}}  # every output in binary, none named
    if input_form == "binary":
        body, headers = infer_body([binary_input(inputs, "FP16")], [inputs.tobytes()], **fields)
    else:
        body, headers = infer_body([json_input(inputs, "FP16")], **fields)
    answer = infer(server, body, headers)
    assert split_response(answer)[1], "binary_data_output asked for binary logits"
    assert_relative_close(logits_of(answer), reference(eager, inputs), CROSS_BACKEND_TOLERANCE, what="FP16")


def test_request_id_is_the_clients_or_a_fresh_one(server: ServerProcess):
    assert call(f"{server.http_url}/v2/health/live", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == (
        "abc-123"
    )
    fresh = call(f"{server.http_url}/v2/models/nope", headers={"x-request-id": "bad id!"})
    assert fresh.status == 404 and fresh.headers["x-request-id"] not in ("", "bad id!")


_GOOD = random_inputs(1, seed=3)
_BINARY = binary_input(_GOOD)
_OVER_MAX = random_inputs(MAX_BATCH + 1)


def _json_body(text: str) -> tuple[bytes, dict[str, str]]:
    return text.encode(), {"Content-Type": "application/json"}


# (id, model, body and headers, status, a fragment of the error message)
BAD_REQUESTS = [
    ("not-json", "digits", _json_body("{inputs: ["), 400, "not valid JSON"),
    ("not-an-object", "digits", _json_body("[1, 2]"), 400, "must be a JSON object"),
    ("no-inputs", "digits", _json_body("{}"), 400, "'inputs' must be a non-empty list"),
    ("wrong-name", "digits", infer_body([{**json_input(_GOOD), "name": "image"}]), 400, "one input named 'input'"),
    ("wrong-shape", "digits", infer_body([json_input(random_inputs(1)[:, :, :5])]), 400, "does not match"),
    ("negative-shape", "digits", infer_body([{**json_input(_GOOD), "shape": [-1, 3, SIZE, SIZE]}]), 400,
     "non-negative"),
    ("batch-over-max", "digits", infer_body([binary_input(_OVER_MAX)], [_OVER_MAX.tobytes()]), 400, "1 to 4 rows"),
    ("wrong-datatype", "digits", infer_body([json_input(_GOOD, "INT32")]), 400, "'INT32' is not supported"),
    ("unknown-datatype", "digits", infer_body([json_input(_GOOD, "FP8")]), 400, "cannot be sent as JSON"),
    ("too-few-values", "digits", infer_body([{**json_input(_GOOD), "data": [1.0, 2.0]}]), 400, "has 2 values"),
    ("strings", "digits", infer_body([{**json_input(_GOOD), "data": ["a"] * _GOOD.size}]), 400, "only numbers"),
    ("ragged", "digits", infer_body([{**json_input(_GOOD), "data": [[1.0], [1.0, 2.0]]}]), 400, "ragged"),
    ("no-data", "digits", infer_body([{"name": "input", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE]}]), 400,
     "neither 'data' nor"),
    ("binary-short", "digits", infer_body([_BINARY], [_GOOD.tobytes()[:-4]]), 400, "the body has"),
    ("binary-extra", "digits", infer_body([_BINARY], [_GOOD.tobytes() + b"1234"]), 400, "add up to"),
    ("binary-size-mismatch", "digits",
     infer_body([{**_BINARY, "parameters": {"binary_data_size": _GOOD.nbytes - 4}}], [_GOOD.tobytes()[:-4]]), 400,
     "needs"),
    ("header-length-bad", "digits", (b"{}", {HEADER_LENGTH: "999"}), 400, HEADER_LENGTH),
    ("unknown-output", "digits", infer_body([json_input(_GOOD)], outputs=[{"name": "probs"}]), 400, "unknown output"),
    ("bad-binary-flag", "digits", infer_body([json_input(_GOOD)], parameters={"binary_data_output": "yes"}), 400,
     "true or false"),
    ("unknown-model", "nope", infer_body([json_input(_GOOD)]), 404, "no model named 'nope'"),
    ("model-not-ready", "missing_weights", infer_body([json_input(_GOOD)]), 503, "not ready"),
    ("over-the-size-limit", "digits", infer_body([_BINARY], [bytes(MAX_MESSAGE_BYTES)]), 413, "exceeded"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "request_", "status", "fragment"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])  # fmt: skip
def test_bad_infer_request_gets_its_status_and_the_next_good_one_succeeds(
    server: ServerProcess, model: str, request_: tuple[bytes, dict[str, str]], status: int, fragment: str
):
    answer = infer(server, *request_, model=model)
    assert answer.status == status, answer.body
    assert fragment in answer.error()
    assert logits_of(infer(server, *infer_body([binary_input(_GOOD)], [_GOOD.tobytes()]))).shape == (1, 10)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v2/models/digits/infer", 405),
    ("POST", "/v2/health/live", 405),
    ("GET", "/v2/nowhere", 404),
    ("GET", "/", 404),
])  # fmt: skip
def test_wrong_endpoints_answer_json_errors(server: ServerProcess, method: str, path: str, status: int):
    answer = call(server.http_url + path, b"" if method == "POST" else None, method=method)
    assert answer.status == status
    assert path in answer.error()


def test_json_error_bodies_are_json_objects(server: ServerProcess):
    answer = infer(server, *_json_body('{"inputs": 5}'))
    assert json.loads(answer.body) == {"error": "'inputs' must be a non-empty list of tensors"}


def test_sigterm_finishes_in_flight_http_requests_and_refuses_new_ones(tmp_path: Path):
    # One image per batch on a model slow enough on a CPU (~50 ms each) that requests are still queued at SIGTERM.
    slow = {"arch": "resnet18", "weights": "random", "input_size": 224, "backend": "eager", "max_batch_size": 1}
    repository = write_repository(tmp_path / "models.toml", {"slow": slow})
    server = start_server(tmp_path, "--grace-period", "60", repository=repository, env=CPU_ONLY)
    try:
        server.wait_until_serving()
        callers = 4
        image = np.random.default_rng(9).standard_normal((1, 3, 224, 224), dtype=np.float32)
        body = infer_body([binary_input(image)], [image.tobytes()])
        with ThreadPoolExecutor(callers) as pool:
            in_flight = [pool.submit(infer, server, *body, model="slow") for _ in range(callers)]

            def all_received() -> bool:
                queued = server.metric("resnet_queue_depth", model="slow")
                return queued >= 1 and queued + server.metric("resnet_batch_size_count", model="slow") >= callers - 1

            deadline = time.monotonic() + 60
            while not all_received():
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.005)
            server.process.send_signal(signal.SIGTERM)
            answers = [future.result(timeout=120) for future in in_flight]
        assert [logits_of(answer).shape for answer in answers] == [(1, 1000)] * callers
        with pytest.raises(urllib.error.URLError):  # the port closed at SIGTERM: no new request is taken
            urllib.request.urlopen(f"{server.http_url}/v2/health/live", timeout=10)
        assert server.process.wait(timeout=60) == 0, server.log()
    finally:
        server.stop()
