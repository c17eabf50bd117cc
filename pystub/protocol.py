"""The wire between a worker and a Python model's stub process, over a socketpair.

A frame is `<u32 frame length><u32 header length><msgpack header><tensor data...>`. The header is
a map with an "op" key; each tensor in it is `{"name", "datatype", "shape", "offset", "size"}`,
its bytes at `offset` in the data section (BYTES in Triton's length-prefixed layout). Tensor data
never goes through msgpack: it is written from the arrays' own buffers and read back as
writable numpy views of the received frame, with no copy on either side. Errors travel as text
with a status, never as pickled exceptions, so nothing the model raises can fail to unpickle
in the worker or run code there.

Messages, worker -> stub: init, execute, finalize, autocomplete.
Stub -> worker: ready, init_error, response, done, finalized, autocompleted.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from natron import datatypes

_PREFIX = struct.Struct("<II")
# A frame carries at most what one NATS message can (64 MiB) plus headroom: a length above
# this is a corrupted stream, not a request.
MAX_FRAME_BYTES = 1 << 30


@dataclass(slots=True)
class WireTensor:
    name: str
    datatype: str
    array: npt.NDArray[Any]


class ChannelClosed(Exception):
    """The other side closed the connection or died."""


class Channel:
    """Framed messages over a connected stream socket. `send` may be called from any thread;
    `recv` from one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout_s: float | None) -> None:
        self._sock.settimeout(timeout_s)

    def send(self, header: dict[str, Any], tensors: dict[str, list[WireTensor]] | None = None) -> None:
        """Send `header`; each list in `tensors` goes into the header under its key."""
        buffers: list[memoryview | bytes] = []
        offset = 0
        body = dict(header)
        for key, items in (tensors or {}).items():
            described = []
            for tensor in items:
                data = _tensor_bytes(tensor)
                size = len(data) if isinstance(data, bytes) else data.nbytes
                described.append(
                    {
                        "name": tensor.name,
                        "datatype": tensor.datatype,
                        "shape": list(tensor.array.shape),
                        "offset": offset,
                        "size": size,
                    }
                )
                if size:
                    buffers.append(data)
                offset += size
            body[key] = described
        packed: bytes = msgpack.packb(body)
        prefix = _PREFIX.pack(4 + len(packed) + offset, len(packed))
        with self._send_lock:
            try:
                self._sock.sendall(prefix + packed)
                for data in buffers:
                    self._sock.sendall(data)
            except OSError as exc:
                raise ChannelClosed(f"{type(exc).__name__}: {exc}") from None

    def recv(self) -> tuple[dict[str, Any], memoryview]:
        """The next header and the frame's data section; raises ChannelClosed at the end."""
        prefix = self._recv_exact(_PREFIX.size)
        frame_length, header_length = _PREFIX.unpack(prefix)
        if frame_length > MAX_FRAME_BYTES or header_length > frame_length - 4:
            raise ChannelClosed(f"corrupted frame (length {frame_length}, header {header_length})")
        frame = self._recv_exact(frame_length - 4)
        header = msgpack.unpackb(memoryview(frame)[:header_length], raw=False)
        if not isinstance(header, dict):
            raise ChannelClosed("corrupted frame: header is not a map")
        return header, memoryview(frame)[header_length:]

    def _recv_exact(self, count: int) -> bytearray:
        buffer = bytearray(count)
        view = memoryview(buffer)
        received = 0
        while received < count:
            try:
                got = self._sock.recv_into(view[received:])
            except OSError as exc:
                raise ChannelClosed(f"{type(exc).__name__}: {exc}") from None
            if got == 0:
                raise ChannelClosed("connection closed")
            received += got
        return buffer

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the other side
            pass
        self._sock.close()


def _tensor_bytes(tensor: WireTensor) -> memoryview | bytes:
    if tensor.datatype == datatypes.BYTES:
        return datatypes.serialize_bytes(tensor.array)
    array = np.ascontiguousarray(tensor.array, dtype=datatypes.to_numpy_dtype(tensor.datatype))
    flat: npt.NDArray[np.uint8] = array.reshape(-1).view(np.uint8)
    return flat.data


def read_tensors(described: list[dict[str, Any]], data: memoryview) -> list[WireTensor]:
    """Tensors of a received header; fixed-size ones are writable views of the frame."""
    tensors = []
    for entry in described:
        name, datatype = entry["name"], entry["datatype"]
        shape = tuple(int(d) for d in entry["shape"])
        start, size = int(entry["offset"]), int(entry["size"])
        if datatype == datatypes.BYTES:
            array = datatypes.deserialize_bytes(data[start : start + size], datatypes.element_count(shape))
            tensors.append(WireTensor(name, datatype, array.reshape(shape)))
            continue
        dtype = datatypes.to_numpy_dtype(datatype)
        count = datatypes.element_count(shape)
        if count * dtype.itemsize != size:
            raise ValueError(f"tensor '{name}' of shape {list(shape)} carries {size} bytes")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=start) if count else np.empty(0, dtype)
        tensors.append(WireTensor(name, datatype, array.reshape(shape)))
    return tensors
