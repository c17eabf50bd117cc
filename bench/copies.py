"""Tensor copies on the wire: encode + decode of a request and a response, the old path against
today's, at 4 KiB, 1 MiB and 16 MiB of FP32 tensor data.

The old path (kept below as `old_encode_*`) copied each tensor twice on encode: `tobytes()`, then
msgpack copying those bytes into its buffer, then `packb` copying the finished message into a
bytes object (three in all). Today's (broker/codec.py) packs a view of the array's memory into a
buffer sized for the message and hands on a view of that buffer: one copy. Decoding is the same
on both paths (msgpack's `bin` becomes bytes, one copy; `np.frombuffer` is a view).

Both paths must produce the same bytes; the script checks that before timing. Besides time, it
reports the peak memory allocated during one encode, in tensor sizes: a direct count of the copies
alive at once.

    .venv/bin/python -m bench.copies [--repeat-s 1.0]

Prints a table and writes bench/results/copies.json. A benchmark, not a test: nothing is asserted
about the times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import codec
from natron import datatypes
from natron.inference import InferRequest, InferResponse, Tensor

SIZES = {"4 KiB": 4 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20}
RESULTS = Path(__file__).resolve().parent / "results" / "copies.json"


# -- the old path, as broker/codec.py and natron/datatypes.py had it ---------------------------


def _old_to_raw(array: Any, datatype: str) -> bytes:
    if datatype == datatypes.BYTES:
        return datatypes.serialize_bytes(array)
    dtype = datatypes.to_numpy_dtype(datatype)
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _old_packb(value: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


def _old_pack_tensor(tensor: Tensor) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
        "data": _old_to_raw(tensor.data, tensor.datatype),
    }


def old_encode_request(request: InferRequest) -> bytes:
    return _old_packb(
        {
            "v": codec.WIRE_VERSION,
            "id": request.id,
            "model": request.model,
            "version": request.version,
            "inputs": [_old_pack_tensor(t) for t in request.inputs],
            "outputs": request.outputs,
            "parameters": request.parameters,
        }
    )


def old_encode_response(response: InferResponse) -> bytes:
    return _old_packb(
        {
            "v": codec.WIRE_VERSION,
            "id": response.id,
            "model": response.model,
            "version": response.version,
            "outputs": [_old_pack_tensor(t) for t in response.outputs],
            "parameters": response.parameters,
        }
    )


# -- measuring ---------------------------------------------------------------------------------


def _per_call_us(call: Callable[[], object], budget_s: float) -> float:
    """Median over rounds of the mean time per call, after one warm-up call."""
    call()
    rounds: list[float] = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(rounds) < 5:
        count = 0
        started = time.perf_counter()
        while count < 3 or time.perf_counter() - started < budget_s / 20:
            call()
            count += 1
        rounds.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(rounds)


def _peak_copies(call: Callable[[], object], tensor_bytes: int) -> float:
    """Peak memory allocated while `call` runs and its result lives, in tensor sizes."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return peak / tensor_bytes


def _cases(tensor_bytes: int) -> tuple[InferRequest, InferResponse]:
    rows = max(1, tensor_bytes // (4 * 256))
    data = np.random.default_rng(0).random((rows, tensor_bytes // 4 // rows), dtype=np.float32)
    tensor = Tensor("INPUT0", "FP32", data.shape, data)
    request = InferRequest("bench-1", "m", "1", [tensor], ["OUTPUT0"])
    response = InferResponse("bench-1", "m", "1", [Tensor("OUTPUT0", "FP32", data.shape, data)])
    return request, response


Encoded = bytes | memoryview


def _row(
    label: str,
    size: int,
    kind: str,
    encoders: dict[str, Callable[[], Encoded]],
    decode: Callable[[Encoded], object],
    budget_s: float,
) -> dict[str, Any]:
    if bytes(encoders["new"]()) != encoders["old"]():
        raise SystemExit(f"{kind} at {label}: the two paths encode different bytes")
    row: dict[str, Any] = {"size": label, "tensor_bytes": size, "message": kind}
    for path, encode in encoders.items():
        row[f"{path}_encode_us"] = round(_per_call_us(encode, budget_s), 1)
        row[f"{path}_encode_peak_x"] = round(_peak_copies(encode, size), 2)
    # Decoding is the same code on both paths: measured once.
    encoded = encoders["new"]()
    row["decode_us"] = round(_per_call_us(lambda: decode(encoded), budget_s), 1)
    row["decode_peak_x"] = round(_peak_copies(lambda: decode(encoded), size), 2)
    old_us = row["old_encode_us"] + row["decode_us"]
    row["speedup"] = round(old_us / (row["new_encode_us"] + row["decode_us"]), 2)
    return row


def _rows_for(label: str, size: int, budget_s: float) -> list[dict[str, Any]]:
    request, response = _cases(size)
    return [
        _row(
            label,
            size,
            "request",
            {"old": lambda: old_encode_request(request), "new": lambda: codec.encode_request(request)},
            codec.decode_request,
            budget_s,
        ),
        _row(
            label,
            size,
            "response",
            {"old": lambda: old_encode_response(response), "new": lambda: codec.encode_response(response)},
            codec.decode_response,
            budget_s,
        ),
    ]


def measure(budget_s: float) -> list[dict[str, Any]]:
    return [row for label, size in SIZES.items() for row in _rows_for(label, size, budget_s)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat-s", type=float, default=1.0, help="time budget per measurement")
    args = parser.parse_args()
    rows = measure(args.repeat_s)
    header = (
        "| tensor | message | encode old µs | encode new µs | decode µs | encode+decode old/new "
        "| encode peak old | encode peak new | decode peak |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        print(
            f"| {r['size']} | {r['message']} | {r['old_encode_us']:,} | {r['new_encode_us']:,} "
            f"| {r['decode_us']:,} | {r['speedup']}x | {r['old_encode_peak_x']}x "
            f"| {r['new_encode_peak_x']}x | {r['decode_peak_x']}x |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"taken_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
