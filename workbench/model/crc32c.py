"""CRC-32C (Castagnoli), as TensorFlow checkpoints and LevelDB tables use it, in numpy; plus TF's masking.

No library in our environment computes CRC-32C, and a byte-at-a-time Python loop would take minutes on
the published 270 MB checkpoint. CRC is linear over GF(2), so the data is cut into many equal lanes
whose CRCs advance together, one numpy table lookup per byte position across all lanes, and the lane
CRCs are then folded in order with a precomputed "advance over LANE zero bytes" map: about a second for
the whole checkpoint.
"""

from __future__ import annotations

import functools

import numpy as np

_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8
LANE = 1024  # bytes per lane
LANES_PER_PASS = 1 << 14  # lanes advanced together (16 MiB of data per pass)


@functools.cache
def _table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY if crc & 1 else 0)
        table[byte] = crc
    return table


@functools.cache
def _table_list() -> list[int]:
    return [int(v) for v in _table()]


def _update_scalar(crc: int, data: bytes | memoryview) -> int:
    """Advance the raw (un-inverted) register over `data`, one byte at a time."""
    table = _table_list()
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


@functools.cache
def _advance_lane_tables() -> list[list[int]]:
    """Byte-wise tables of the linear map 'advance the register over LANE zero bytes'."""
    table = _table()
    basis = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
    for _ in range(LANE):
        basis = table[basis & 0xFF] ^ (basis >> 8)
    images = [int(v) for v in basis]  # image of bit i
    tables = []
    for byte_index in range(4):
        entries = []
        for value in range(256):
            image = 0
            for bit in range(8):
                if value >> bit & 1:
                    image ^= images[8 * byte_index + bit]
            entries.append(image)
        tables.append(entries)
    return tables


def _advance_lane(crc: int) -> int:
    t0, t1, t2, t3 = _advance_lane_tables()
    return t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24]


def crc32c(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """The standard CRC-32C of `data` (crc32c(b"123456789") == 0xE3069283)."""
    buffer = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    table = _table()
    crc = 0xFFFFFFFF
    lanes_total = len(buffer) // LANE
    for first in range(0, lanes_total, LANES_PER_PASS):
        count = min(LANES_PER_PASS, lanes_total - first)
        # (LANE, count): row i holds byte i of every lane, contiguous for the vectorised step.
        block = np.ascontiguousarray(buffer[first * LANE:(first + count) * LANE].reshape(count, LANE).T)
        lane_crcs = np.zeros(count, dtype=np.uint32)
        for row in block:
            lane_crcs = table[(lane_crcs ^ row) & 0xFF] ^ (lane_crcs >> 8)
        for lane_crc in lane_crcs.tolist():
            crc = _advance_lane(crc) ^ lane_crc
    crc = _update_scalar(crc, buffer[lanes_total * LANE:].tobytes())
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """TensorFlow's (and LevelDB's) masked form of a CRC, as stored in files."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rotated = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF
