"""Where a graph's weights go on disk: streamed into external data, moved inline when small.

The exporter always saves with external data: onnx_ir writes the initializers one at a
time into `model.onnx.data`, so saving costs one tensor of memory beside the model.
Saving inline instead builds the whole protobuf in memory and serialises it (twice the
weights beside the model). Graphs that should be one file (below the exporter's 1 GiB
threshold) are therefore moved inline *after* the model has been released, and
`inline_weights` streams the data file into the one-file proto (one chunk in memory),
writing the same bytes an inline save would.
"""

from __future__ import annotations

import os
from pathlib import Path


def initializer_bytes(path: Path) -> int:
    """Bytes of the graph's initializers, inline raw data and external data alike."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            n = 1
            for d in t.dims:
                n *= d
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _split(message, number: int):
    """Two copies of `message`: its fields numbered below `number`, and those above it.

    Protobuf serialises known fields in field-number order, so `below + field + above` is
    the canonical encoding of the message with that field in place.
    """
    below, above = type(message)(), type(message)()
    below.CopyFrom(message)
    above.CopyFrom(message)
    for fd, _ in message.ListFields():
        (above if fd.number < number else below).ClearField(fd.name)
        if fd.number == number:
            above.ClearField(fd.name)
    return below, above


def _field(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)  # length-delimited field header


def inline_weights(path: Path, chunk: int = 64 << 20) -> None:
    """Rewrite the graph at `path` as one file with its external data inline; remove the data file.

    The bytes equal an inline save of the same model (canonical protobuf encoding: each
    initializer's raw data in place, its external-data fields absent), but they are
    written piece by piece: the proto is loaded without its weights, and each
    initializer's data is copied from the data file in `chunk`-sized reads. Memory: the
    weightless graph plus one chunk, whatever the model size.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    pieces: list[tuple[bytes, tuple[Path, int, int] | None, bytes]] = []  # (head, data span, tail)
    data_files: set[Path] = set()
    for t in graph.initializer:
        if not uses_external_data(t):
            pieces.append((t.SerializeToString(), None, b""))
            continue
        ext = {e.key: e.value for e in t.external_data}
        src = path.parent / ext["location"]
        data_files.add(src)
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
        bare = onnx.TensorProto()
        bare.CopyFrom(t)
        del bare.external_data[:]
        bare.ClearField("data_location")
        below, above = _split(bare, 9)  # TensorProto.raw_data = 9
        pieces.append((below.SerializeToString() + _field(9, length), (src, offset, length),
                       above.SerializeToString()))
    sizes = [len(h) + (span[2] if span else 0) + len(tail) for h, span, tail in pieces]
    del graph.initializer[:]
    g_below, g_above = _split(graph, 5)  # GraphProto.initializer = 5
    g_head, g_tail = g_below.SerializeToString(), g_above.SerializeToString()
    graph_len = len(g_head) + sum(len(_field(5, n)) + n for n in sizes) + len(g_tail)
    model.ClearField("graph")
    m_below, m_above = _split(model, 7)  # ModelProto.graph = 7
    tmp = path.with_name(path.name + ".inline")
    with open(tmp, "wb") as out:
        out.write(m_below.SerializeToString() + _field(7, graph_len) + g_head)
        for (head, span, tail), n in zip(pieces, sizes):
            out.write(_field(5, n) + head)
            if span is not None:
                src, offset, length = span
                with open(src, "rb") as fh:
                    fh.seek(offset)
                    left = length
                    while left:
                        buf = fh.read(min(chunk, left))
                        if not buf:
                            raise OSError(f"{src}: external data ends before {offset + length}")
                        out.write(buf)
                        left -= len(buf)
            out.write(tail)
        out.write(g_tail + m_above.SerializeToString())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    for p in data_files:
        if p.is_file():
            p.unlink()
