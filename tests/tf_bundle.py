"""A TensorFlow 2 checkpoint WRITER for tests: makes `PREFIX.index` + `PREFIX.data-00000-of-00001` files.

Written independently of the reader in `workbench.model.tf_checkpoint` (it encodes where the reader
decodes), following the tensor-bundle layout TensorFlow's BundleWriter produces: a LevelDB-format table
whose first entry (empty key) is the BundleHeaderProto and whose other entries, sorted by name, are
BundleEntryProto records pointing at raw little-endian tensors in the data shard, each with its masked
CRC-32C. The importer only ever reads; this exists so tests can make checkpoints without TensorFlow.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from workbench.model.crc32c import crc32c, mask

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
NO_COMPRESSION = 0
DT_FLOAT = 1
DT_STRING = 7


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: int | bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + _varint(payload)
    if wire_type == 5:
        return key + int(payload).to_bytes(4, "little")
    return key + _varint(len(payload)) + payload


def encode_entry(dtype: int, shape: tuple[int, ...], shard_id: int, offset: int, size: int, crc: int) -> bytes:
    dims = b"".join(_field(2, 2, _field(1, 0, d)) for d in shape)
    message = _field(1, 0, dtype) + _field(2, 2, dims)
    if shard_id:
        message += _field(3, 0, shard_id)
    if offset:
        message += _field(4, 0, offset)
    return message + _field(5, 0, size) + _field(6, 5, crc)


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        if i % restart_interval == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = 0
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    out += b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))
    return bytes(out)


def write_table(entries: list[tuple[bytes, bytes]], block_bytes: int = 4096) -> bytes:
    """A LevelDB-format table of sorted (key, value) entries, uncompressed, as TF writes its index."""
    assert [k for k, _ in entries] == sorted(k for k, _ in entries), "table keys must be sorted"
    out, index = bytearray(), []

    def add_block(contents: bytes) -> tuple[int, int]:
        handle = (len(out), len(contents))
        trailer = bytes([NO_COMPRESSION])
        out.extend(contents + trailer + struct.pack("<I", mask(crc32c(contents + trailer))))
        return handle

    chunk: list[tuple[bytes, bytes]] = []
    for key, value in entries:
        chunk.append((key, value))
        if sum(len(k) + len(v) for k, v in chunk) >= block_bytes:
            handle = add_block(_block(chunk))
            index.append((chunk[-1][0], _varint(handle[0]) + _varint(handle[1])))
            chunk = []
    if chunk:
        handle = add_block(_block(chunk))
        index.append((chunk[-1][0], _varint(handle[0]) + _varint(handle[1])))
    metaindex = add_block(_block([]))
    index_handle = add_block(_block(index, restart_interval=1))
    footer = _varint(metaindex[0]) + _varint(metaindex[1]) + _varint(index_handle[0]) + _varint(index_handle[1])
    out += footer.ljust(FOOTER_SIZE - 8, b"\0") + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out)


def write_bundle(prefix: Path, tensors: dict[str, np.ndarray], object_graph: bytes | None = b"object graph",
                 raw_entries: dict[str, bytes] | None = None) -> None:
    """Write float32 `tensors` as a one-shard TF2 bundle: PREFIX.index + PREFIX.data-00000-of-00001.

    As TF's BundleWriter: header under the empty key, entries sorted by name, raw little-endian data,
    masked CRC-32C per tensor, and a `_CHECKPOINTABLE_OBJECT_GRAPH` string tensor (a stand-in payload
    here: the importer never decodes it). `raw_entries` adds index records as given.
    """
    prefix = Path(prefix)
    data, records = bytearray(), {}
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        raw = array.tobytes()
        records[name.encode()] = encode_entry(DT_FLOAT, array.shape, 0, len(data), len(raw), mask(crc32c(raw)))
        data += raw
    if object_graph is not None:
        records[b"_CHECKPOINTABLE_OBJECT_GRAPH"] = encode_entry(DT_STRING, (), 0, len(data), len(object_graph),
                                                                mask(crc32c(object_graph)))
        data += object_graph
    for name, value in (raw_entries or {}).items():
        records[name.encode()] = value
    header = _field(1, 0, 1) + _field(3, 2, _field(1, 0, 1))  # num_shards 1, little-endian, version 1
    entries = [(b"", header)] + sorted(records.items())
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    Path(f"{prefix}.index").write_bytes(write_table(entries))
