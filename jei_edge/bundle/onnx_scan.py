"""Read what the runtime must check in an ONNX file without importing ``onnx``.

The on-device runtime needs numpy + a backend only, so this reads the protobuf wire format
directly, just far enough to find:

- ``ir_version`` and the ``opset_import`` list (for clear "built with opset N" errors);
- every external-data ``location`` referenced by a tensor anywhere in the model (graph
  initializers, sparse initializers, tensors in node attributes, nested subgraphs and
  functions), so a bundle whose ONNX points outside itself is refused before a backend reads it;
- the main graph's nodes (op type, domain, input and output names), for backend decisions that
  depend on the graph's structure (``jei_edge.backends.onnxruntime.executor.session_kwargs``).

Field numbers are those of ``onnx.proto`` (ModelProto, GraphProto, NodeProto, AttributeProto,
TensorProto, SparseTensorProto, FunctionProto).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

# wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class OnnxScanError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


@dataclass(frozen=True)
class OnnxNode:
    """A node of the main graph: what the wiring checks need (no attributes)."""

    op_type: str
    domain: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]


@dataclass
class OnnxInfo:
    ir_version: int = 0
    opsets: Dict[str, int] = field(default_factory=dict)  # domain ("" = ai.onnx) -> version
    external_locations: List[str] = field(default_factory=list)
    nodes: List[OnnxNode] = field(default_factory=list)  # the main graph's, in file order

    @property
    def opset(self) -> int:
        return self.opsets.get("", self.opsets.get("ai.onnx", 0))


def _varint(buf: memoryview, i: int, end: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= end:
            raise OnnxScanError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise OnnxScanError("varint too long")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[Tuple[int, int, object]]:
    """Yield ``(field_number, wire_type, value)``; LEN values are ``(start, end)`` offsets."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        num, wt = key >> 3, key & 7
        if wt == _VARINT:
            value, i = _varint(buf, i, end)
        elif wt == _I64:
            value, i = None, i + 8
        elif wt == _I32:
            value, i = None, i + 4
        elif wt == _LEN:
            n, i = _varint(buf, i, end)
            value = (i, i + n)
            i += n
        else:
            raise OnnxScanError(f"unsupported wire type {wt}")
        if i > end:
            raise OnnxScanError("field runs past the end of its message")
        yield num, wt, value


def _string(buf: memoryview, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _tensor(buf, span, out: OnnxInfo) -> None:
    location, external = None, False
    for num, wt, v in _fields(buf, *span):
        if num == 13 and wt == _LEN:  # external_data: StringStringEntryProto
            key = val = None
            for n2, w2, v2 in _fields(buf, *v):
                if n2 == 1 and w2 == _LEN:
                    key = _string(buf, v2)
                elif n2 == 2 and w2 == _LEN:
                    val = _string(buf, v2)
            if key == "location":
                location = val
        elif num == 14 and wt == _VARINT and v == 1:  # data_location = EXTERNAL
            external = True
    if location is not None or external:
        out.external_locations.append(location if location is not None else "")


def _sparse(buf, span, out) -> None:
    for num, wt, v in _fields(buf, *span):
        if num in (1, 2) and wt == _LEN:
            _tensor(buf, v, out)


def _attribute(buf, span, out) -> None:
    for num, wt, v in _fields(buf, *span):
        if wt != _LEN:
            continue
        if num in (5, 10):  # t, tensors
            _tensor(buf, v, out)
        elif num in (6, 11):  # g, graphs
            _graph(buf, v, out)
        elif num in (22, 23):  # sparse_tensor, sparse_tensors
            _sparse(buf, v, out)


def _node(buf, span, out, top: bool = False) -> None:
    inputs: List[str] = []
    outputs: List[str] = []
    op_type = domain = ""
    for num, wt, v in _fields(buf, *span):
        if wt != _LEN:
            continue
        if num == 5:
            _attribute(buf, v, out)
        elif top:
            if num == 1:
                inputs.append(_string(buf, v))
            elif num == 2:
                outputs.append(_string(buf, v))
            elif num == 4:
                op_type = _string(buf, v)
            elif num == 7:
                domain = _string(buf, v)
    if top:
        out.nodes.append(OnnxNode(op_type, domain, tuple(inputs), tuple(outputs)))


def _graph(buf, span, out, top: bool = False) -> None:
    for num, wt, v in _fields(buf, *span):
        if wt != _LEN:
            continue
        if num == 1:
            _node(buf, v, out, top)
        elif num == 5:
            _tensor(buf, v, out)
        elif num == 15:
            _sparse(buf, v, out)


def _function(buf, span, out) -> None:
    for num, wt, v in _fields(buf, *span):
        if num == 7 and wt == _LEN:
            _node(buf, v, out)


def scan_onnx_bytes(data: bytes) -> OnnxInfo:
    """IR version, opsets, external-data locations and main-graph nodes of a serialized ONNX ModelProto."""
    buf = memoryview(data)
    info = OnnxInfo()
    for num, wt, v in _fields(buf, 0, len(buf)):
        if num == 1 and wt == _VARINT:
            info.ir_version = int(v)
        elif num == 7 and wt == _LEN:
            _graph(buf, v, info, top=True)
        elif num == 8 and wt == _LEN:
            domain, version = "", 0
            for n2, w2, v2 in _fields(buf, *v):
                if n2 == 1 and w2 == _LEN:
                    domain = _string(buf, v2)
                elif n2 == 2 and w2 == _VARINT:
                    version = int(v2)
            info.opsets[domain] = version
        elif num == 25 and wt == _LEN:
            _function(buf, v, info)
    return info


def scan_onnx_file(path) -> OnnxInfo:
    with open(path, "rb") as f:
        return scan_onnx_bytes(f.read())
