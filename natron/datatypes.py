"""Triton's tensor datatypes: names, numpy dtypes, config enums and the BYTES layout.

BYTES tensors travel in Triton's layout everywhere (HTTP binary data, the NATS wire format):
each element is a 4-byte little-endian length followed by that many bytes. In memory they are
numpy object arrays of `bytes`. BF16 uses `ml_dtypes.bfloat16`, which numpy lacks natively.
"""

from __future__ import annotations

import struct
from typing import Final

import ml_dtypes
import numpy as np
import numpy.typing as npt

from natron.errors import InvalidArgument

BYTES: Final = "BYTES"

# Triton datatype name -> numpy dtype (little-endian, as the wire requires).
_NUMPY: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    BYTES: np.dtype(np.object_),
}

DATATYPES: Final = frozenset(_NUMPY)

# numpy's limits on a shape, checked before numpy sees it (it raises ValueError past them).
MAX_DIMS: Final = 64
MAX_DIM_SIZE: Final = 2**63

# Datatypes that Triton's JSON encoding cannot carry: they travel as binary data only.
BINARY_ONLY: Final = frozenset({"FP16", "BF16"})


def to_numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    try:
        return _NUMPY[datatype]
    except KeyError:
        raise InvalidArgument(f"unknown datatype '{datatype}'") from None


def from_numpy_dtype(dtype: np.dtype[np.generic]) -> str:
    if dtype == np.object_ or dtype.kind in ("S", "U"):
        return BYTES
    if dtype == ml_dtypes.bfloat16:
        return "BF16"
    for name, candidate in _NUMPY.items():
        if candidate == dtype:
            return name
    raise InvalidArgument(f"numpy dtype {dtype} has no Triton datatype")


def element_size(datatype: str) -> int:
    """Bytes per element; 0 for BYTES, whose elements vary in size."""
    if datatype == BYTES:
        return 0
    return to_numpy_dtype(datatype).itemsize


# config.pbtxt's DataType enum names ("TYPE_FP32") <-> protocol names ("FP32").
def config_to_datatype(config_type: str) -> str:
    name = config_type.removeprefix("TYPE_")
    if name == "STRING":
        return BYTES
    if name not in _NUMPY:
        raise InvalidArgument(f"unsupported config data_type '{config_type}'")
    return name


def datatype_to_config(datatype: str) -> str:
    return "TYPE_STRING" if datatype == BYTES else f"TYPE_{datatype}"


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


_LEN = struct.Struct("<I")


def serialize_bytes(array: npt.NDArray[np.object_]) -> bytes:
    """BYTES tensor -> Triton's length-prefixed layout, in C order."""
    parts: list[bytes] = []
    for item in array.ravel(order="C"):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int | None = None) -> npt.NDArray[np.object_]:
    """Triton's length-prefixed layout -> flat object array of bytes.

    With `count`, the buffer must hold exactly that many elements; any truncation or
    trailing garbage is a client mistake, reported as InvalidArgument.
    """
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    end = len(view)
    while offset < end:
        if offset + 4 > end:
            raise InvalidArgument("BYTES tensor data is truncated inside an element length")
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidArgument("BYTES tensor element runs past the end of its data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if count is not None and len(items) != count:
        raise InvalidArgument(f"BYTES tensor holds {len(items)} elements, its shape needs {count}")
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out


def to_raw(array: npt.NDArray[np.generic], datatype: str) -> bytes:
    """A tensor's raw little-endian bytes in C order (BYTES: the length-prefixed layout)."""
    if datatype == BYTES:
        return serialize_bytes(array)  # type: ignore[arg-type]
    return np.ascontiguousarray(array, dtype=to_numpy_dtype(datatype)).tobytes()


def raw_view(array: npt.NDArray[np.generic], datatype: str) -> bytes | memoryview:
    """The bytes of `to_raw`, as a view of the array's own memory where it already has the
    wire's layout (contiguous, little-endian): an encoder that copies them into its message
    then makes the only copy. Otherwise (a strided view, another byte order or dtype) numpy
    makes the one contiguous copy first. BYTES: the length-prefixed layout, built anew."""
    if datatype == BYTES:
        return serialize_bytes(array)  # type: ignore[arg-type]
    dtype = to_numpy_dtype(datatype)
    if array.dtype == dtype and array.flags.c_contiguous and array.size and datatype != "BF16":
        # The quick way for the common case; numpy cannot export BF16 (ml_dtypes) buffers.
        return array.data.cast("B")
    contiguous = np.ascontiguousarray(array, dtype=dtype)
    # A uint8 view exports a plain byte buffer, whatever the element type.
    return memoryview(contiguous.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # a buffer on 3.11


def from_raw(data: bytes | memoryview, datatype: str, shape: tuple[int, ...]) -> npt.NDArray[np.generic]:
    """Raw bytes -> array of `shape`, zero-copy for fixed-size types.

    Raises InvalidArgument when the byte count does not match the shape.
    """
    if len(shape) > MAX_DIMS or any(not 0 <= d < MAX_DIM_SIZE for d in shape):
        raise InvalidArgument(
            f"shape {list(shape)}: at most {MAX_DIMS} dimensions, each in 0..{MAX_DIM_SIZE - 1}"
        )
    count = element_count(shape)
    # numpy also refuses a shape whose non-zero dimensions multiply past its index range,
    # even when a zero dimension makes the tensor empty.
    if element_count([d for d in shape if d]) >= MAX_DIM_SIZE:
        raise InvalidArgument(f"shape {list(shape)} holds more elements than any tensor can")
    if datatype == BYTES:
        return deserialize_bytes(data, count).reshape(shape)
    dtype = to_numpy_dtype(datatype)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"tensor of datatype {datatype} and shape {list(shape)} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
