"""Checks on an ONNX file before ONNX Runtime opens it, by a minimal protobuf walk (no onnx package needed)."""
from __future__ import annotations

import mmap
from pathlib import Path

from .errors import ModelError

#: Protobuf fields that lead to TensorProtos in an ONNX file: {message: {field number: message of that field}}.
#: ModelProto 7 graph, 25 functions; GraphProto 1 node, 5 initializer, 15 sparse_initializer; NodeProto
#: 5 attribute; AttributeProto 5 t, 6 g, 10 tensors, 11 graphs, 22 sparse_tensor, 23 sparse_tensors;
#: FunctionProto 7 node; SparseTensorProto 1 values, 2 indices; TensorProto 13 external_data.
_PROTO_FIELDS = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
_MAX_PROTO_DEPTH = 64


class _ProtoError(Exception):
    pass


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _ProtoError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _scan_proto(data, pos: int, end: int, kind: str, found: list, depth: int = 0,
                operators: set | None = None) -> None:
    """Walk one protobuf message of ``kind``; append the ``location`` of every external tensor to ``found`` (and
    add the operator type of every node to ``operators``, when given)."""
    if depth > _MAX_PROTO_DEPTH:
        raise _ProtoError("messages nested too deeply")
    fields = _PROTO_FIELDS.get(kind, {})
    key = value = None
    while pos < end:
        tag, pos = _varint(data, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise _ProtoError("field runs past the end of its message")
            if kind == "entry" and number in (1, 2):
                text = bytes(data[pos:pos + length]).decode("utf-8", "replace")
                key, value = (text, value) if number == 1 else (key, text)
            elif kind == "node" and number == 4 and operators is not None:  # NodeProto 4: op_type
                operators.add(bytes(data[pos:pos + length]).decode("utf-8", "replace"))
            elif number in fields:
                _scan_proto(data, pos, pos + length, fields[number], found, depth + 1, operators)
            pos += length
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        if pos > end:
            raise _ProtoError("field runs past the end of its message")
    if kind == "entry" and key == "location":
        found.append(value or "")


def external_data_locations(path: Path) -> list[str]:
    """The external-data ``location`` of every tensor in an ONNX file, read without ONNX or ONNX Runtime.

    A minimal protobuf walk over the messages that can hold tensors (graphs, subgraphs, functions, node
    attributes, sparse tensors); tensor payloads are skipped, not read. Raises ModelError for a file that is
    not a well-formed protobuf message.
    """
    found: list[str] = []
    _scan_file(path, found)
    return found


def operator_types(path: Path) -> set[str]:
    """The operator types (``op_type``) of every node of an ONNX file, subgraphs and functions included."""
    operators: set[str] = set()
    _scan_file(path, [], operators)
    return operators


def _scan_file(path: Path, found: list, operators: set | None = None) -> None:
    with open(path, "rb") as handle:
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                _scan_proto(data, 0, len(data), "model", found, operators=operators)
            except _ProtoError as exc:
                raise ModelError(f"{path}: not a loadable ONNX model ({exc}); check the file is a complete ONNX "
                                 "export") from None


def check_external_data(path: Path) -> None:
    """Refuse a model whose external data would be read from outside the model's own folder.

    Checked before ONNX Runtime opens the file, so that a model cannot make IBIX read another file (an absolute
    location, ``..``, or a symbolic link leading out of the folder).
    """
    folder = path.resolve().parent
    for location in external_data_locations(path):
        where = Path(location)
        target = (folder / where).resolve()
        if not location or where.is_absolute() or location.startswith(("/", "\\")) or ":" in location \
                or (target != folder and folder not in target.parents):
            raise ModelError(f"{path}: refused: the model's external data location {location!r} points outside "
                             f"the model's folder {folder}; IBIX reads external tensor data only from files "
                             "beside the model (re-export it with its .data file in the same folder)")
        if not target.is_file():
            raise ModelError(f"{path}: the model's external data file {location!r} is missing from {folder}; "
                             "copy it beside the model")
