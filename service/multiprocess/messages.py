"""The messages between frontends and the engine on their Unix socket: a length-prefixed frame per message.

Inference requests and their results are fixed struct headers (plus the model name, the shape, and the tensor's bytes
only when it did not fit a slot); they are most of the traffic, and packing one costs a few microseconds. The rest
(the engine's model states, load/unload/statistics calls, a frontend's request counts) is rare and pickled. Both
ends are this code, on a socket in a directory only the service's user can open, so pickle's trust in its peer holds.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

from service.batcher import BatcherStoppedError, BatchTooLargeError, DeadlineExceededError, QueueFullError
from service.model_manager import ModelLoadError
from service.served_models import ModelNotFoundError, ModelNotReadyError

_FRAME = struct.Struct("<IB")  # body bytes, kind
_INFER = struct.Struct("<QdiBB")  # request id, deadline (NaN: none), slot (-1: inline), dtype code, dimensions
_RESULT = struct.Struct("<QiIIIii")  # request id, slot (-1: inline), queue_us, compute_us, batch_size, rows, classes
_ID = struct.Struct("<Q")
MAX_FRAME_BYTES = 1 << 30
logger = logging.getLogger(__name__)

# The dtypes a request tensor may have (service/tensor_input.py, the decoder); the code is the index.
_DTYPES = (torch.uint8, torch.float32, torch.float16)
# The errors an engine answers with that say what is wrong (mapped to status codes by service/rpc.py); the frontend
# raises the same class, any other becomes EngineError (INTERNAL), logged with its traceback by the engine.
ENGINE_ERRORS = (
    QueueFullError,
    DeadlineExceededError,
    BatchTooLargeError,
    BatcherStoppedError,
    ModelNotFoundError,
    ModelLoadError,
    ModelNotReadyError,
)


class Kind(enum.IntEnum):
    HELLO = 1  # frontend -> engine, pickled Hello
    STATE = 2  # engine -> frontend, pickled EngineState
    INFER = 3  # frontend -> engine
    RESULT = 4  # engine -> frontend: logits
    FAILED = 5  # engine -> frontend: request id, pickled (error class name, message)
    CANCEL = 6  # frontend -> engine: request id
    CALL = 7  # frontend -> engine: request id, pickled (operation, argument)
    ANSWER = 8  # engine -> frontend: request id, pickled answer (or FAILED)
    RECORD = 9  # frontend -> engine: pickled request counts for the model's statistics


_KINDS = frozenset(Kind)


@dataclass(frozen=True)
class Hello:
    frontend: int  # the frontend's index; a new connection from the same index replaces the old one
    pid: int
    slot_file: str
    slot_bytes: int


@dataclass(frozen=True)
class InferRequest:
    request_id: int
    model: str
    deadline: float | None  # time.monotonic() seconds: one clock for every process of the machine
    slot: int  # -1: `inline` holds the tensor's bytes
    dtype: torch.dtype
    shape: tuple[int, ...]
    inline: bytes = b""


@dataclass(frozen=True)
class InferResult:
    request_id: int
    slot: int  # -1: `inline` holds the float32 logits
    queue_us: int
    compute_us: int
    batch_size: int
    rows: int
    classes: int
    inline: bytes = b""


def frame(kind: Kind, body: bytes) -> bytes:
    return _FRAME.pack(len(body), kind) + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[Kind, bytes] | None:
    """The next message, or None at the end of the stream (the peer closed or died) or when the peer sent what is no
    frame of ours (logged): both ends then treat the connection as ended."""
    try:
        header = await reader.readexactly(_FRAME.size)
        length, kind = _FRAME.unpack(header)
        if length > MAX_FRAME_BYTES or kind not in _KINDS:
            logger.error("ending the connection: its peer sent a frame of kind %d and %d bytes", kind, length)
            return None
        return Kind(kind), await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def pack_pickled(kind: Kind, value: Any, request_id: int | None = None) -> bytes:
    prefix = b"" if request_id is None else _ID.pack(request_id)
    return frame(kind, prefix + pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def unpack_pickled(body: bytes, with_id: bool = False) -> tuple[int, Any]:
    """(request id or 0, value)."""
    if not with_id:
        return 0, pickle.loads(body)
    (request_id,) = _ID.unpack_from(body)
    return request_id, pickle.loads(body[_ID.size :])


def pack_cancel(request_id: int) -> bytes:
    return frame(Kind.CANCEL, _ID.pack(request_id))


def unpack_id(body: bytes) -> int:
    return _ID.unpack_from(body)[0]


def pack_infer(request: InferRequest) -> bytes:
    name = request.model.encode()
    deadline = math.nan if request.deadline is None else request.deadline
    header = _INFER.pack(request.request_id, deadline, request.slot, _DTYPES.index(request.dtype), len(request.shape))
    shape = struct.pack(f"<{len(request.shape)}q", *request.shape)
    return frame(Kind.INFER, header + shape + struct.pack("<H", len(name)) + name + request.inline)


def unpack_infer(body: bytes) -> InferRequest:
    request_id, deadline, slot, dtype_code, dimensions = _INFER.unpack_from(body)
    offset = _INFER.size
    shape = struct.unpack_from(f"<{dimensions}q", body, offset)
    offset += 8 * dimensions
    (name_bytes,) = struct.unpack_from("<H", body, offset)
    offset += 2
    name = body[offset : offset + name_bytes].decode()
    return InferRequest(
        request_id,
        name,
        None if math.isnan(deadline) else deadline,
        slot,
        _DTYPES[dtype_code],
        tuple(shape),
        body[offset + name_bytes :],
    )


def pack_result(result: InferResult) -> bytes:
    header = _RESULT.pack(
        result.request_id,
        result.slot,
        result.queue_us,
        result.compute_us,
        result.batch_size,
        result.rows,
        result.classes,
    )
    return frame(Kind.RESULT, header + result.inline)


def unpack_result(body: bytes) -> InferResult:
    request_id, slot, queue_us, compute_us, batch_size, rows, classes = _RESULT.unpack_from(body)
    return InferResult(request_id, slot, queue_us, compute_us, batch_size, rows, classes, body[_RESULT.size :])


def inline_tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor that travelled inline (a copy: the frame's bytes are not kept)."""
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape) if data else torch.empty(shape, dtype=dtype)


class EngineError(RuntimeError):
    """The engine failed a request for a reason of its own (a bug: INTERNAL); its log has the traceback."""


def error_of(error: BaseException) -> tuple[str, str]:
    """What a FAILED message carries of an exception: its class name and its message."""
    return type(error).__name__, str(error)


def raised(name: str, message: str) -> Exception:
    """The exception a FAILED message stands for, in the frontend."""
    for error_type in ENGINE_ERRORS:
        if error_type.__name__ == name:
            return error_type(message)
    return EngineError(f"{name}: {message}")


class CoalescingWriter:
    """A connection's writer whose frames written in one turn of the event loop leave in one send: the answers to a
    whole batch are written in one turn (the batcher settles them together), so they cost one system call, not one
    each."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def close(self) -> None:
        """Sends what is pending, then closes."""
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._writer.is_closing():
            self._writer.writelines(pending)
