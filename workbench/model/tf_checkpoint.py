"""Read a TensorFlow 2 checkpoint ("tensor bundle") without TensorFlow.

A bundle is `PREFIX.index` plus `PREFIX.data-SSSSS-of-NNNNN` shards:

- the index is a LevelDB-format table: a 48-byte footer (metaindex and index block handles as varints,
  padding, magic 0xdb4775248b80fb57); blocks of prefix-compressed entries (varint shared / unshared key
  lengths and value length) followed by restart offsets; each block trailed by a type byte (0 plain,
  1 snappy) and the masked CRC-32C of block + type. The index block maps separator keys to data blocks.
- the entry with the empty key is a `BundleHeaderProto` (num_shards, endianness, version); every other
  key is a tensor name whose value is a `BundleEntryProto` (dtype, shape, shard_id, offset, size,
  crc32c, slices). Both are decoded here from the protobuf wire format by hand (varints and
  length-delimited fields; a few fields, no protobuf dependency).
- a shard holds each tensor's raw little-endian bytes at [offset, offset + size); the entry's crc32c is
  the masked CRC-32C of those bytes and is checked on every read.

Everything that is wrong with the files becomes one `WorkbenchError` line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.errors import WorkbenchError
from workbench.model.crc32c import crc32c, unmask

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1

# tensorflow/core/framework/types.proto
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_BFLOAT16, DT_HALF = 9, 10, 14, 19
NUMPY_DTYPES = {DT_FLOAT: "<f4", DT_DOUBLE: "<f8", DT_INT32: "<i4", DT_UINT8: "u1", DT_INT16: "<i2",
                DT_INT8: "i1", DT_INT64: "<i8", DT_BOOL: "?", DT_HALF: "<f2", DT_BFLOAT16: "<u2"}
DTYPE_NAMES = {DT_FLOAT: "float32", DT_DOUBLE: "float64", DT_INT32: "int32", DT_UINT8: "uint8",
               DT_INT16: "int16", DT_INT8: "int8", DT_STRING: "string", DT_INT64: "int64", DT_BOOL: "bool",
               DT_BFLOAT16: "bfloat16", DT_HALF: "float16"}
FLOAT_DTYPES = {DT_FLOAT, DT_DOUBLE, DT_HALF, DT_BFLOAT16}


class CorruptData(Exception):
    """A structural problem inside a file; turned into a WorkbenchError naming the file."""


# ------------------------------------------------------------------------------------------ primitives

def read_varint(data: bytes, position: int) -> tuple[int, int]:
    """Decode a base-128 varint at `position`; returns (value, position after it)."""
    value = shift = 0
    while True:
        if position >= len(data):
            raise CorruptData("varint runs past the end of its buffer")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise CorruptData("varint longer than 10 bytes")


def protobuf_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for every field of a serialized protobuf message."""
    fields, position = [], 0
    while position < len(data):
        key, position = read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = read_varint(data, position)
        elif wire_type == 1:
            value, position = int.from_bytes(data[position:position + 8], "little"), position + 8
        elif wire_type == 2:
            length, position = read_varint(data, position)
            value, position = bytes(data[position:position + length]), position + length
        elif wire_type == 5:
            value, position = int.from_bytes(data[position:position + 4], "little"), position + 4
        else:
            raise CorruptData(f"unsupported protobuf wire type {wire_type}")
        if position > len(data) or number == 0:
            raise CorruptData("truncated or malformed protobuf message")
        fields.append((number, wire_type, value))
    return fields


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def snappy_decompress(data: bytes) -> bytes:
    """Decode a raw snappy block (LevelDB's optional block compression; TF itself writes plain blocks)."""
    expected, position = read_varint(data, 0)
    out = bytearray()
    while position < len(data):
        tag = data[position]
        position += 1
        kind = tag & 3
        if kind == 0:  # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(data[position:position + extra], "little")
                position += extra
            length += 1
            out += data[position:position + length]
            position += length
            continue
        if kind == 1:
            length, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | data[position]
            position += 1
        elif kind == 2:
            length, offset = (tag >> 2) + 1, int.from_bytes(data[position:position + 2], "little")
            position += 2
        else:
            length, offset = (tag >> 2) + 1, int.from_bytes(data[position:position + 4], "little")
            position += 4
        if offset == 0 or offset > len(out):
            raise CorruptData("snappy copy reaches before the start of the block")
        for _ in range(length):  # copies may overlap their own output
            out.append(out[-offset])
    if len(out) != expected:
        raise CorruptData(f"snappy block decodes to {len(out)} bytes, header says {expected}")
    return bytes(out)


# --------------------------------------------------------------------------------------- LevelDB table

def _block_handle(data: bytes, position: int) -> tuple[tuple[int, int], int]:
    offset, position = read_varint(data, position)
    size, position = read_varint(data, position)
    return (offset, size), position


def _read_block(table: bytes, handle: tuple[int, int]) -> bytes:
    offset, size = handle
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(table):
        raise CorruptData(f"block at {offset} (+{size} bytes) runs past the end of the file")
    contents = table[offset:end]
    block_type = table[end]
    stored_crc = int.from_bytes(table[end + 1:end + 5], "little")
    if unmask(stored_crc) != crc32c(table[offset:end + 1]):
        raise CorruptData(f"checksum mismatch in the block at byte {offset}")
    if block_type == NO_COMPRESSION:
        return contents
    if block_type == SNAPPY_COMPRESSION:
        return snappy_decompress(contents)
    raise CorruptData(f"unknown block compression type {block_type}")


def block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one table block, keys rebuilt from their shared prefixes."""
    if len(block) < 4:
        raise CorruptData("block shorter than its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * restarts
    if restarts < 1 or limit < 0:
        raise CorruptData("bad restart array in block")
    entries, key, position = [], b"", 0
    while position < limit:
        shared, position = read_varint(block, position)
        unshared, position = read_varint(block, position)
        value_length, position = read_varint(block, position)
        if shared > len(key) or position + unshared + value_length > limit:
            raise CorruptData("block entry overruns its block")
        key = key[:shared] + block[position:position + unshared]
        position += unshared
        entries.append((key, block[position:position + value_length]))
        position += value_length
    return entries


def read_table(table: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB-format table, in key order."""
    if len(table) < FOOTER_SIZE:
        raise CorruptData(f"{len(table)} bytes is too short for a table footer")
    footer = table[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
        raise CorruptData("no table magic number at the end (not an index file, or truncated)")
    _metaindex, position = _block_handle(footer, 0)
    index_handle, _ = _block_handle(footer, position)
    entries = []
    for _separator, handle_bytes in block_entries(_read_block(table, index_handle)):
        handle, _ = _block_handle(handle_bytes, 0)
        entries += block_entries(_read_block(table, handle))
    return entries


# -------------------------------------------------------------------------------------------- bundles

@dataclass(frozen=True)
class BundleEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    masked_crc32c: int | None
    sliced: bool

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, f"dtype {self.dtype}")


def _parse_shape(data: bytes) -> tuple[int, ...]:
    dims = []
    for number, _, value in protobuf_fields(data):
        if number == 2:  # Dim
            size = 0
            for dim_number, _, dim_value in protobuf_fields(value):
                if dim_number == 1:
                    size = _signed64(dim_value)
            dims.append(size)
        elif number == 3 and value:
            raise CorruptData("tensor of unknown rank")
    return tuple(dims)


def parse_entry(name: str, data: bytes) -> BundleEntry:
    dtype = shard_id = offset = size = 0
    shape: tuple[int, ...] = ()
    crc, sliced = None, False
    for number, _, value in protobuf_fields(data):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = _parse_shape(value)
        elif number == 3:
            shard_id = value
        elif number == 4:
            offset = _signed64(value)
        elif number == 5:
            size = _signed64(value)
        elif number == 6:
            crc = value
        elif number == 7:
            sliced = True
    return BundleEntry(name, dtype, shape, shard_id, offset, size, crc, sliced)


def resolve_prefix(path: Path) -> Path:
    """The bundle prefix for `PREFIX.index`, `PREFIX` itself, or a folder holding one `*.index`."""
    path = Path(path)
    if path.suffix == ".index":
        if not path.is_file():
            raise WorkbenchError(f"checkpoint index {path} does not exist")
        return path.with_suffix("")
    if path.is_dir():
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            raise WorkbenchError(f"{path}: expected one checkpoint .index file in this folder, found {len(indexes)}")
        return indexes[0].with_suffix("")
    if Path(f"{path}.index").is_file():
        return path
    raise WorkbenchError(f"{path}: not a TensorFlow checkpoint (no {path.name}.index beside it)")


class TensorBundle:
    """An opened checkpoint: `entries` (name -> BundleEntry) parsed from the index; `read(name)` a tensor."""

    def __init__(self, path: Path):
        self.prefix = resolve_prefix(path)
        self.index_path = Path(f"{self.prefix}.index")
        try:
            records = read_table(self.index_path.read_bytes())
            header, self.entries = self._parse_records(records)
        except CorruptData as error:
            raise WorkbenchError(f"{self.index_path}: not a readable TensorFlow checkpoint index ({error})") from None
        except OSError as error:
            raise WorkbenchError(f"{self.index_path}: cannot read ({error.strerror or error})") from None
        self.num_shards = header.get(1, 1)
        if header.get(2, 0) != 0:
            raise WorkbenchError(f"{self.index_path}: big-endian checkpoints are not supported")
        for entry in self.entries.values():
            if not 0 <= entry.shard_id < self.num_shards:
                raise WorkbenchError(f"{self.index_path}: tensor {entry.name} names shard {entry.shard_id} "
                                     f"of {self.num_shards}")
        missing = [p for p in self.shard_paths() if not p.is_file()]
        if missing:
            raise WorkbenchError(f"{missing[0]}: checkpoint data file is missing (needed beside {self.index_path.name})")

    @staticmethod
    def _parse_records(records: list[tuple[bytes, bytes]]) -> tuple[dict[int, int], dict[str, BundleEntry]]:
        if not records or records[0][0] != b"":
            raise CorruptData("no bundle header entry (is this a TensorFlow 2 checkpoint?)")
        header = {number: value for number, _, value in protobuf_fields(records[0][1]) if number in (1, 2)}
        entries = {}
        for key, value in records[1:]:
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptData(f"tensor name is not UTF-8: {key[:40]!r}") from None
            entries[name] = parse_entry(name, value)
        return header, entries

    def shard_paths(self) -> list[Path]:
        return [Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}") for shard in range(self.num_shards)]

    def read(self, name: str, verify: bool = True) -> np.ndarray:
        """The tensor `name` as a numpy array of its stored dtype and shape (CRC-32C checked)."""
        entry = self.entries[name]
        shard = self.shard_paths()[entry.shard_id]
        if entry.sliced:
            raise WorkbenchError(f"{self.index_path}: {name} is a partitioned (sliced) variable; not supported")
        if entry.dtype not in NUMPY_DTYPES:
            raise WorkbenchError(f"{self.index_path}: {name} has unsupported dtype {entry.dtype_name}")
        itemsize = np.dtype(NUMPY_DTYPES[entry.dtype]).itemsize
        count = int(np.prod(entry.shape, dtype=np.int64))
        if entry.size != count * itemsize or entry.offset < 0:
            raise WorkbenchError(f"{self.index_path}: {name} claims {entry.size} bytes for shape {entry.shape}")
        data = bytearray(entry.size)  # writable, so arrays made from it are too
        with open(shard, "rb") as handle:
            handle.seek(entry.offset)
            got = handle.readinto(data)
        if got != entry.size:
            raise WorkbenchError(f"{shard}: truncated (tensor {name} needs bytes {entry.offset}..{entry.offset + entry.size})")
        if verify and entry.masked_crc32c is not None and unmask(entry.masked_crc32c) != crc32c(data):
            raise WorkbenchError(f"{shard}: checksum mismatch in tensor {name} (file corrupt)")
        array = np.frombuffer(data, dtype=NUMPY_DTYPES[entry.dtype]).reshape(entry.shape)
        if entry.dtype == DT_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array
