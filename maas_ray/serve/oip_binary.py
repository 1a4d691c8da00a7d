"""The Open Inference Protocol's binary tensor data extension, as Triton and KServe speak it.

A request or answer is a JSON header followed by raw tensor bytes; the
``Inference-Header-Content-Length`` header gives the JSON's length, and each binary
tensor says its byte count in ``parameters.binary_data_size`` (in tensor order).
``tritonclient.http`` sends inputs this way and asks for binary outputs by default
(``binary_data_output`` for the request, or ``binary_data`` per requested output).
Tensors are little-endian and row-major; ``BYTES`` elements are a 4-byte little-endian
length and then the bytes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

HEADER = "inference-header-content-length"

DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


class BinaryDataError(ValueError):
    """The binary part of a request does not match its JSON header."""


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary rest) of a request body."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise BinaryDataError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise BinaryDataError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    return body[:n], body[n:]


def binary_inputs(inputs: list[Any], rest: bytes) -> list[np.ndarray | None]:
    """Each input's values read from ``rest`` when it is sent as binary, else None."""
    out: list[np.ndarray | None] = []
    offset = 0
    for tensor in inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            out.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(rest):
            raise BinaryDataError(f"input {tensor.name!r}: binary_data_size {size!r} does not fit the "
                                  f"{len(rest) - offset} bytes left in the body")
        if tensor.data:
            raise BinaryDataError(f"input {tensor.name!r} has both binary_data_size and data")
        dtype = DTYPES.get(tensor.datatype.upper())
        if dtype is None:
            raise BinaryDataError(f"input {tensor.name!r}: datatype {tensor.datatype!r} is not numeric")
        itemsize = np.dtype(dtype).itemsize
        if size % itemsize:
            raise BinaryDataError(f"input {tensor.name!r}: {size} bytes is not a whole number of "
                                  f"{tensor.datatype} values")
        out.append(np.frombuffer(rest[offset:offset + size], dtype=np.dtype(dtype).newbyteorder("<")))
        offset += size
    if offset != len(rest):
        raise BinaryDataError(f"{len(rest) - offset} bytes after the last binary input")
    return out


def wants_binary(request: Any, name: str) -> bool:
    """Whether output ``name`` goes back as binary: per requested output, else the request's
    ``binary_data_output``."""
    for requested in request.outputs or []:
        if requested.get("name") == name:
            return bool((requested.get("parameters") or {}).get("binary_data", False))
    return bool((request.parameters or {}).get("binary_data_output", False))


def requested(request: Any, name: str) -> bool:
    """An answer holds only the outputs asked for, or all when none are named."""
    return not request.outputs or any(o.get("name") == name for o in request.outputs)


def encode(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = []
        for v in values:
            raw = str(v).encode()
            parts.append(len(raw).to_bytes(4, "little") + raw)
        return b"".join(parts)
    return np.asarray(values, dtype=np.dtype(DTYPES[datatype]).newbyteorder("<")).tobytes()


def binary_answer(answer: dict[str, Any], binary: set[str]) -> tuple[bytes, int]:
    """(body, JSON header length) with the named outputs' data moved into the binary part."""
    blobs = []
    for out in answer["outputs"]:
        if out["name"] in binary:
            blob = encode(out["datatype"], out.pop("data"))
            out["parameters"] = {**(out.get("parameters") or {}), "binary_data_size": len(blob)}
            blobs.append(blob)
    header = json.dumps(answer, separators=(",", ":")).encode()
    return header + b"".join(blobs), len(header)
