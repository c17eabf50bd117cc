"""Infer straight over NATS, without HTTP and without natron's code: nats-py, msgpack and numpy.

A client written from docs/wire-format.md alone, and a reference for clients in other languages:

    python examples/nats_direct.py --nats-url nats://127.0.0.1:4222 --nats-creds client.nk

(`natron serve` prints where the client credentials are: `NATS credentials: ...`.)

resolves the highest READY version of `tiny` from the `natron_models` key-value bucket, publishes
one row `0..15` into the work queue and prints the answer (`OUTPUT0 = 2 * INPUT0 + 1`).
Exit status: 0 answered, 1 an error answer or refusal, 2 no answer in time or no broker.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nats
import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

WIRE_VERSION = 1
REPLY_TO = "Natron-Reply-To"
DEADLINE_NS = "Natron-Deadline-Ns"
STATUS = "Natron-Status"

# Fixed-size datatypes: little-endian numpy dtypes. BF16 and BYTES are handled apart.
DTYPES: dict[str, str] = {
    "BOOL": "|b1",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
_LENGTH = struct.Struct("<I")


class InferenceError(Exception):
    """A failed inference with the status natron's protocol gives it (HTTP numbering)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


# -- tensors -----------------------------------------------------------------------------------


def tensor_bytes(array: np.ndarray[Any, Any], datatype: str) -> bytes:
    """An array's wire bytes: little-endian, C order; BYTES length-prefixed; BF16 from float32."""
    if datatype == "BYTES":
        parts = []
        for item in np.asarray(array, dtype=object).ravel(order="C"):
            data = item.encode() if isinstance(item, str) else bytes(item)
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)
    if datatype == "BF16":
        # The upper half of the float32 bit pattern, rounded to nearest even (NaN kept a NaN).
        bits = np.ascontiguousarray(array, dtype="<f4").view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan = np.isnan(np.asarray(array, dtype="<f4"))
        upper = np.where(nan, (bits >> 16) | 0x40, rounded).astype("<u2")
        return upper.tobytes()
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def tensor_array(datatype: str, shape: list[int], data: bytes) -> np.ndarray[Any, Any]:
    """Wire bytes -> array (BF16 widened to float32, BYTES an object array of bytes)."""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(data):
            (length,) = _LENGTH.unpack_from(data, offset)
            items.append(data[offset + 4 : offset + 4 + length])
            offset += 4 + length
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out.reshape(shape)
    if datatype == "BF16":
        upper = np.frombuffer(data, dtype="<u2", count=count)
        return (upper.astype("<u4") << 16).view("<f4").reshape(shape)
    return np.frombuffer(data, dtype=DTYPES[datatype], count=count).reshape(shape)


def encode_request(
    model: str,
    inputs: dict[str, tuple[str, np.ndarray[Any, Any]]],
    *,
    request_id: str = "",
    version: str = "",
    outputs: list[str] | None = None,
) -> bytes:
    """The msgpack request map; `inputs` maps each input name to (datatype, array)."""
    body = {
        "v": WIRE_VERSION,
        "id": request_id,
        "model": model,
        "version": version,
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": [int(d) for d in np.shape(array)],
                "data": tensor_bytes(array, datatype),
            }
            for name, (datatype, array) in inputs.items()
        ],
        "outputs": outputs or [],
        "parameters": {},
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


# -- the client --------------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    """A worker's answer: its status and its decoded body (None when not a msgpack map)."""

    status: int
    body: dict[str, Any] | None
    raw: bytes = field(repr=False, default=b"")

    @property
    def error(self) -> str:
        message = self.body.get("error") if self.body else None
        return message if isinstance(message, str) else f"undecodable error answer {self.raw[:80]!r}"


def header_block_size(headers: dict[str, str]) -> int:
    """Bytes NATS adds for headers, which count toward max_payload with the body."""
    return len("NATS/1.0\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in headers.items()) + 2


def pub_ack_error(msg: Msg) -> InferenceError | None:
    """The refusal a JetStream publish acknowledgement carries, if any."""
    headers = msg.headers or {}
    if headers.get("Status") == "503":  # no stream captures the subject
        return InferenceError(503, "no stream takes this subject: is natron running, is the prefix right?")
    try:
        ack = json.loads(msg.data)
    except ValueError:
        return InferenceError(500, f"undecodable publish acknowledgement {msg.data[:80]!r}")
    error = ack.get("error") if isinstance(ack, dict) else None
    if error:
        description = error.get("description", "") if isinstance(error, dict) else str(error)
        return InferenceError(503, f"request not queued (queue full or unavailable): {description}")
    return None


class DirectClient:
    """One wildcard subscription on a private inbox carries every answer and acknowledgement.

    Request `n` is answered on `<inbox>.n` and acknowledged by JetStream on `<inbox>.n.a`; a
    message for a token nobody waits for any more (timed out, or a duplicate answer after a
    redelivery) is ignored.
    """

    def __init__(self, nc: Client, prefix: str = "natron") -> None:
        self.nc = nc
        self.prefix = prefix
        self._inbox = ""
        self._tokens = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Answer]] = {}
        self._sub: Subscription | None = None

    async def __aenter__(self) -> DirectClient:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox + ".>", cb=self._on_message)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1 :]
        is_ack = token.endswith(".a")
        future = self._pending.get(token[:-2] if is_ack else token)
        if future is None or future.done():
            return  # not waited for (any more): a late or duplicate message
        if is_ack:
            error = pub_ack_error(msg)
            if error is not None:
                future.set_exception(error)
            return
        status = int((msg.headers or {}).get(STATUS, "200"))
        try:
            body = msgpack.unpackb(msg.data, raw=False)
        except Exception:  # msgpack raises several types on garbage
            body = None
        future.set_result(Answer(status, body if isinstance(body, dict) else None, msg.data))

    async def model_record(self, model: str) -> dict[str, Any]:
        """The model's JSON record in the `<prefix>_models` key-value bucket."""
        js = self.nc.jetstream()
        try:
            kv = await js.key_value(f"{self.prefix}_models")
            entry = await kv.get(model)
        except KeyNotFoundError as exc:  # a subclass of NotFoundError: first
            raise InferenceError(404, f"unknown model '{model}'") from exc
        except (BucketNotFoundError, NotFoundError) as exc:
            raise InferenceError(503, f"no bucket '{self.prefix}_models': is natron running?") from exc
        record: dict[str, Any] = json.loads(entry.value or b"{}")
        return record

    async def resolve_version(self, model: str, version: str | None = None) -> str:
        """`version` if it is READY, or without one the highest READY version (compared as integers)."""
        record = await self.model_record(model)
        versions: dict[str, dict[str, str]] = record.get("versions", {})
        if version:
            if version not in versions:
                raise InferenceError(404, f"model '{model}' has no version {version}")
            state = versions[version]
            if state.get("state") != "READY":
                raise InferenceError(503, f"model '{model}' version {version} is {state.get('state')}")
            return version
        ready = [v for v, s in versions.items() if s.get("state") == "READY"]
        if not ready:
            states = "; ".join(f"v{v} {s.get('state')} {s.get('reason', '')}" for v, s in versions.items())
            raise InferenceError(
                503, f"model '{model}' has no READY version: {states or record.get('reason')}"
            )
        return max(ready, key=int)

    async def send(
        self, subject: str, payload: bytes, *, timeout_s: float, deadline_ns: int | None = None
    ) -> Answer:
        """Publish one request and wait for its answer; raise InferenceError on refusal or timeout.

        The deadline defaults to now + timeout_s. A non-200 answer is returned, not raised.
        """
        token = str(next(self._tokens))
        reply = f"{self._inbox}.{token}"
        if deadline_ns is None:
            deadline_ns = time.time_ns() + int(timeout_s * 1e9)
        headers = {REPLY_TO: reply, DEADLINE_NS: str(deadline_ns)}
        size = len(payload) + header_block_size(headers)
        if size > self.nc.max_payload:
            raise InferenceError(413, f"request of {size} bytes exceeds max_payload {self.nc.max_payload}")
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[token] = future  # before publishing: the answer may come at once
        try:
            await self.nc.publish(subject, payload, reply=reply + ".a", headers=headers)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise InferenceError(504, f"no answer from {subject} within {timeout_s} s") from None
        finally:
            del self._pending[token]

    async def infer(
        self,
        model: str,
        inputs: dict[str, tuple[str, np.ndarray[Any, Any]]],
        *,
        version: str | None = None,
        outputs: list[str] | None = None,
        request_id: str = "",
        timeout_s: float = 5.0,
    ) -> tuple[str, dict[str, tuple[str, np.ndarray[Any, Any]]]]:
        """Run `model`; return the version that ran and its outputs as name -> (datatype, array)."""
        version = await self.resolve_version(model, version)
        payload = encode_request(model, inputs, request_id=request_id, version=version, outputs=outputs)
        answer = await self.send(f"{self.prefix}.infer.{model}.{version}", payload, timeout_s=timeout_s)
        if answer.status != 200:
            raise InferenceError(answer.status, answer.error)
        body = answer.body
        if body is None or body.get("v") != WIRE_VERSION:
            raise InferenceError(500, f"unexpected answer {answer.raw[:80]!r}")
        results = {
            t["name"]: (t["datatype"], tensor_array(t["datatype"], t["shape"], t["data"]))
            for t in body.get("outputs", [])
        }
        return str(body.get("version", version)), results


# -- command line ------------------------------------------------------------------------------


async def _quiet(exc: Exception) -> None:
    """nats-py logs connection errors with tracebacks by default; main reports them itself."""


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument(
        "--nats-creds",
        default=None,
        help="the client's credentials: an nkey seed file, or a NATS .creds file",
    )
    parser.add_argument("--prefix", default="natron", help="subject prefix of the deployment")
    parser.add_argument("--model", default="tiny", help="a model with one FP32 input INPUT0 of [-1, 16]")
    parser.add_argument("--version", default=None, help="default: the highest READY version")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args(argv)

    credentials = {}
    if args.nats_creds:
        # A .creds file holds a JWT and its seed; natron's own credentials are a bare nkey seed.
        is_jwt = "BEGIN NATS USER JWT" in Path(args.nats_creds).read_text()  # noqa: ASYNC240 (once, at start)
        credentials = {"user_credentials" if is_jwt else "nkeys_seed": args.nats_creds}
    try:
        nc = await nats.connect(
            args.nats_url,
            connect_timeout=3,
            max_reconnect_attempts=1,
            allow_reconnect=False,
            error_cb=_quiet,
            **credentials,
        )
    except Exception as exc:  # refused, unreachable, not a NATS server
        print(f"cannot connect to {args.nats_url}: {exc!r}", file=sys.stderr)
        return 2
    try:
        async with DirectClient(nc, args.prefix) as client:
            x = np.arange(16, dtype=np.float32).reshape(1, 16)
            version, outputs = await client.infer(
                args.model, {"INPUT0": ("FP32", x)}, version=args.version, timeout_s=args.timeout_s
            )
    except InferenceError as exc:
        print(f"inference failed with status {exc.status}: {exc.message}", file=sys.stderr)
        return 2 if exc.status == 504 else 1
    finally:
        await nc.close()
    print(f"model {args.model} version {version}")
    print(f"INPUT0 FP32 {list(x.shape)} = {x.ravel().tolist()}")
    for name, (datatype, array) in outputs.items():
        print(f"{name} {datatype} {list(array.shape)} = {array.ravel().tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
