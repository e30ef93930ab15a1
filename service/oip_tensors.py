"""Open Inference Protocol (v2) tensors: request bodies in JSON or with the binary tensor extension, and responses.

Pure codecs, no HTTP: `parse_infer_request(body, header_length)` checks a request and returns its
inputs as numpy arrays (BYTES as lists: of bytes from the binary tail, of the strings themselves from JSON); `encode_infer_response` writes outputs as JSON
data or, when asked for (`binary_data` on an output or `binary_data_output` on the request), as raw
little-endian bytes after the JSON header (`Inference-Header-Content-Length`). A BYTES element in
binary form is a 4-byte little-endian length then the bytes. Every malformed body raises
TensorError (a 400), never anything else.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.inputs import describe_validation_errors

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
ParameterValue = str | int | float | bool


class TensorError(ValueError):
    """A malformed inference request (answered 400 `{"error": "..."}`)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputTensor(_Strict):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, ParameterValue] = {}
    data: Any = None


class RequestedOutput(_Strict):
    name: str
    parameters: dict[str, ParameterValue] = {}


class InferRequest(_Strict):
    id: str | None = None
    parameters: dict[str, ParameterValue] = {}
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, ParameterValue] | None = Field(None, description="binary_data_size for binary outputs")
    data: list[Any] | None = Field(None, description="row-major; absent for binary outputs")


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, ParameterValue] | None = None
    outputs: list[OutputTensor]


@dataclass(frozen=True)
class Tensor:
    """A decoded input: a numpy array, or for BYTES a flat list (bytes in binary form, str in JSON)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    value: np.ndarray | list[bytes] | list[str]


def parse_infer_request(body: bytes, header_length: str | None) -> tuple[InferRequest, dict[str, Tensor]]:
    """(the request's JSON header, its inputs by name, data decoded from JSON or from the binary tail)."""
    if header_length is None:
        header, tail = body, b""
    else:
        if not header_length.isdigit():
            raise TensorError(f"Inference-Header-Content-Length {header_length!r} is not a byte count")
        length = int(header_length)
        if length == 0:
            raise TensorError("raw binary requests (Inference-Header-Content-Length: 0) are not supported: "
                              "send a JSON header naming the input")
        if length > len(body):
            raise TensorError(f"Inference-Header-Content-Length {length} is over the body's {len(body)} bytes")
        header, tail = body[:length], body[length:]
    try:
        request = InferRequest.model_validate(json.loads(header))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorError(f"the inference request header is not valid JSON ({e})") from e
    except ValidationError as e:
        raise TensorError(f"malformed inference request: {describe_validation_errors(e.errors())}") from e
    tensors: dict[str, Tensor] = {}
    offset = 0
    for spec in request.inputs:
        if spec.name in tensors:
            raise TensorError(f"input {spec.name!r} is given twice")
        tensors[spec.name], offset = _input_tensor(spec, tail, offset)
    if offset != len(tail):
        raise TensorError(f"the body has {len(tail) - offset} bytes after the last binary input")
    return request, tensors


def _input_tensor(spec: InputTensor, tail: bytes, offset: int) -> tuple[Tensor, int]:
    if any(d < 0 for d in spec.shape):
        raise TensorError(f"input {spec.name!r}: shape {spec.shape} has a negative dimension")
    count = math.prod(spec.shape)
    if spec.datatype != "BYTES" and spec.datatype not in DTYPES:
        raise TensorError(f"input {spec.name!r}: unknown datatype {spec.datatype!r}")
    size = spec.parameters.get("binary_data_size")
    if size is not None:
        if spec.data is not None:
            raise TensorError(f"input {spec.name!r} has both JSON data and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TensorError(f"input {spec.name!r}: binary_data_size {size!r} is not a byte count")
        chunk = tail[offset:offset + size]
        if len(chunk) != size:
            raise TensorError(f"input {spec.name!r}: binary_data_size {size} but only {len(chunk)} bytes follow")
        value = _from_binary(spec, chunk, count)
        offset += size
    elif spec.data is None:
        raise TensorError(f"input {spec.name!r} has no data (neither JSON 'data' nor binary_data_size)")
    else:
        value = _from_json(spec, count)
    return Tensor(spec.name, spec.datatype, tuple(spec.shape), value), offset


def _from_binary(spec: InputTensor, chunk: bytes, count: int) -> np.ndarray | list[bytes]:
    if spec.datatype == "BYTES":
        elements, pos = [], 0
        while pos < len(chunk):
            if pos + 4 > len(chunk):
                raise TensorError(f"input {spec.name!r}: truncated BYTES element length")
            (n,) = struct.unpack_from("<I", chunk, pos)
            if pos + 4 + n > len(chunk):
                raise TensorError(f"input {spec.name!r}: BYTES element of {n} bytes overruns the tensor")
            elements.append(chunk[pos + 4:pos + 4 + n])
            pos += 4 + n
        if len(elements) != count:
            raise TensorError(f"input {spec.name!r}: {len(elements)} BYTES elements for shape {spec.shape}")
        return elements
    dtype = DTYPES[spec.datatype]
    if len(chunk) != count * dtype.itemsize:
        raise TensorError(f"input {spec.name!r}: {len(chunk)} bytes for shape {spec.shape} of {spec.datatype} "
                          f"({count * dtype.itemsize} expected)")
    return np.frombuffer(chunk, dtype=dtype).reshape(spec.shape)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item))
    return out


def _from_json(spec: InputTensor, count: int) -> np.ndarray | list[str]:
    flat = _flatten(spec.data)
    if len(flat) != count:
        raise TensorError(f"input {spec.name!r}: {len(flat)} elements for shape {spec.shape}")
    if spec.datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise TensorError(f"input {spec.name!r}: BYTES data in JSON must be strings")
        return flat
    if not all(isinstance(x, int | float) and not isinstance(x, str) for x in flat):
        raise TensorError(f"input {spec.name!r}: {spec.datatype} data must be numbers")
    try:
        return np.asarray(flat, dtype=DTYPES[spec.datatype]).reshape(spec.shape)
    except (OverflowError, ValueError) as e:
        raise TensorError(f"input {spec.name!r}: data does not fit {spec.datatype} ({e})") from e


def _datatype(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    return next(name for name, dtype in DTYPES.items() if dtype == array.dtype.newbyteorder("<"))


def encode_infer_response(head: dict[str, Any], outputs: dict[str, np.ndarray],
                          binary: dict[str, bool]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when all outputs are JSON); `binary` says per output how to send it."""
    described, chunks = [], []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": _datatype(array), "shape": list(array.shape)}
        if binary[name]:
            raw = (b"".join(struct.pack("<I", len(x)) + x for x in (v.encode() if isinstance(v, str) else v
                                                                      for v in array.ravel()))
                   if array.dtype == object else np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = list(array.ravel()) if array.dtype == object else array.ravel()
        described.append(entry)
    header = orjson.dumps({**head, "outputs": described}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
