"""Bit packing and byte-row gathers shared by the PyTorch paths of the ops.

Codes of ``bits`` bits (1, 2 or 4) are packed ``8 // bits`` per byte, lowest bits first; the
Triton kernels use the same layout, so either backend can unpack what the other packed.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor

# P = 8 // bits codes share a byte. Reading P consecutive one-byte codes as one P-byte
# little-endian word, one multiplication moves every code to its place in the packed byte: the
# product's terms ``code_j << (8 j + m_k)`` are bit fields that never overlap (so nothing carries)
# and those with k = j line up as ``code_j << (OFFSET + bits * j)``. Two whole-tensor passes,
# where shifting and merging neighbours takes six and a strided copy.
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16}
_LITTLE_ENDIAN = sys.byteorder == "little"


def _gather_multiplier(bits: int) -> tuple[int, int]:
    """(multiplier, shift) that pack the ``8 // bits`` codes of one word into its top byte's place."""
    per_byte = 8 // bits
    offset = (8 - bits) * (per_byte - 1)
    multiplier = sum(1 << (offset - (8 - bits) * slot) for slot in range(per_byte))
    word_bits = 8 * per_byte
    # The word dtype is signed: the same bit pattern as a signed constant (products wrap).
    if multiplier >= 1 << (word_bits - 1):
        multiplier -= 1 << word_bits
    return multiplier, offset


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack a flat uint8 tensor of codes (each < 2**bits), lowest bits first, zero-padded."""
    per_byte = 8 // bits
    padding = (-codes.numel()) % per_byte
    padded = F.pad(codes, (0, padding)) if padding else codes
    if not _LITTLE_ENDIAN:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (padded.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    multiplier, shift = _gather_multiplier(bits)
    # The arithmetic shift may copy a sign bit into the high bits: the cast keeps the low byte.
    return (padded.view(_WORD_DTYPES[per_byte]) * multiplier >> shift).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: a flat uint8 tensor of ``numel`` codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    if not _LITTLE_ENDIAN:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & mask).view(-1)[:numel]
    words = packed.to(_WORD_DTYPES[per_byte])
    spread = words.clone()
    for slot in range(1, per_byte):
        spread |= words << ((8 - bits) * slot)
    byte_mask = int.from_bytes(bytes([mask]) * per_byte, "little")
    return (spread & byte_mask).view(torch.uint8)[:numel]


# index_select copies from a 1-D table several times faster than row by row from a 2-D one: a
# row of 8 or 16 bytes is moved as one int64 / complex128 element (bytes only, nothing computed).
_ROW_ELEMENTS = {8: torch.int64, 16: torch.complex128}


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
    """``table.index_select(0, index)`` for a contiguous 2-D ``table``."""
    element = _ROW_ELEMENTS.get(table.shape[1] * table.element_size())
    if element is None:
        return table.index_select(0, index)
    return table.view(element).view(-1).index_select(0, index).view(table.dtype).view(-1, table.shape[1])


# Gathered rows are applied chunk by chunk: one chunk of multipliers (1 MiB in fp32) stays in
# cache between the gather and the product, where a whole-tensor gather writes a fresh buffer of
# 2-4 bytes per element to memory and reads it back (2-4x slower inside a training step on CPU).
GATHER_CHUNK = 1 << 18


def multiply_gathered_rows(values: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """``values * gather_rows(table, index).flatten()[:values.numel()]`` for a flat ``values``.

    The product is computed in the promoted dtype of ``values`` and ``table`` and rounded once
    into ``values``' dtype.
    """
    row, numel = table.shape[1], values.numel()
    out = torch.empty_like(values)
    chunk = GATHER_CHUNK - GATHER_CHUNK % row
    for start in range(0, numel, chunk):
        stop = min(start + chunk, numel)
        rows = gather_rows(table, index[start // row : -(-stop // row)]).view(-1)[: stop - start]
        if rows.dtype != values.dtype and torch.promote_types(rows.dtype, values.dtype) == rows.dtype:
            # The same single rounding, faster: torch's mixed-dtype product into a narrower
            # output is a slower loop than an in-place product in the table's dtype and a copy.
            out[start:stop].copy_(rows.mul_(values[start:stop]))
        else:
            torch.mul(values[start:stop], rows, out=out[start:stop])
    return out
