"""A small HTTP client for the tests of the KServe v2 HTTP/REST endpoints (stdlib only, bounded by a timeout). Not named
http.py: scripts run from tests/support (the tritonclient probes) would import it as the standard library's http."""

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        """The {"error": "..."} message every failure carries (asserts it is there)."""
        assert self.headers.get("Content-Type", "").startswith("application/json"), self.headers
        (message,) = self.json().values()
        assert isinstance(message, str) and message, self.body
        return message


def call(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
    tls: ssl.SSLContext | None = None,
):
    """One request (over TLS with `tls`, for https URLs); a 4xx/5xx answer is returned like any other, not raised."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30, context=tls) as response:
            return HttpAnswer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return HttpAnswer(error.code, dict(error.headers), error.read())


def infer_body(inputs: list[dict[str, Any]], binary: list[bytes] = (), **fields: Any) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 infer body: JSON, followed by `binary` (Triton's binary tensor extension) when there is any."""
    header = json.dumps({"inputs": inputs, **fields}).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(binary), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def split_response(answer: HttpAnswer) -> tuple[dict[str, Any], bytes]:
    """The JSON header of an infer answer and the binary data after it."""
    length = int(answer.headers.get(HEADER_LENGTH, len(answer.body)))
    return json.loads(answer.body[:length]), answer.body[length:]
