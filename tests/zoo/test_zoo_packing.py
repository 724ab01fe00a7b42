"""Bit packing: documented layout, bit-exact round trips, range checks."""

from __future__ import annotations

import pytest
import torch

from qdetr.zoo.packing import pack_codes, packed_num_bytes, unpack_codes


def _reference_pack(codes, bits, qmin):
    """Plain-Python LSB-first bit stream, the layout documented in qdetr.zoo.packing."""
    out = bytearray(packed_num_bytes(len(codes), bits))
    for i, q in enumerate(codes):
        u = q - qmin
        for k in range(bits):
            j = i * bits + k
            out[j // 8] |= ((u >> k) & 1) << (j % 8)
    return list(out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 13, 1001])
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_bit_exact(bits, numel, signed):
    qmin = -(2 ** (bits - 1)) if signed else 0
    gen = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(qmin, qmin + 2**bits, (numel,), generator=gen, dtype=torch.int32)
    packed = pack_codes(codes, bits=bits, qmin=qmin)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_num_bytes(numel, bits),)
    assert packed.tolist() == _reference_pack(codes.tolist(), bits, qmin)
    assert torch.equal(unpack_codes(packed, bits=bits, qmin=qmin, numel=numel), codes)


def test_documented_byte_layouts():
    # 4 bits: code 0 in the low nibble.
    assert pack_codes(torch.tensor([-8, 7, 0, -1]), bits=4, qmin=-8).tolist() == [0xF0, 0x78]
    # 2 bits: four codes per byte, code 0 in bits 0-1.
    assert pack_codes(torch.tensor([-2, -1, 0, 1]), bits=2, qmin=-2).tolist() == [0b11100100]
    # 3 bits: 8 codes in 3 bytes; u = 0..7 -> 0b111_110_101_100_011_010_001_000 LSB first.
    packed = pack_codes(torch.arange(-4, 4), bits=3, qmin=-4)
    assert packed.tolist() == [0b10001000, 0b11000110, 0b11111010]
    # 8 bits: one byte per code, stored as the unsigned offset.
    assert pack_codes(torch.tensor([-128, 127], dtype=torch.int8), bits=8, qmin=-128).tolist() == [0, 255]


def test_shapes_and_dtypes_survive():
    codes = torch.randint(-4, 4, (5, 3, 3, 3), dtype=torch.int8)
    packed = pack_codes(codes, bits=3, qmin=-4)
    assert packed.numel() == (135 * 3 + 7) // 8
    back = unpack_codes(packed, bits=3, qmin=-4, numel=codes.numel(), shape=codes.shape, dtype=torch.int8)
    assert back.dtype == torch.int8 and torch.equal(back, codes)


def test_empty_tensor():
    packed = pack_codes(torch.zeros(0, dtype=torch.int8), bits=4, qmin=-8)
    assert packed.numel() == 0
    assert unpack_codes(packed, bits=4, qmin=-8, numel=0).numel() == 0


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError, match=r"\[-2, 1\] for 2-bit"):
        pack_codes(torch.tensor([0, 2]), bits=2, qmin=-2)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_codes(torch.tensor([0.0]), bits=2, qmin=-2)
    with pytest.raises(ValueError, match="bits must be"):
        pack_codes(torch.tensor([0]), bits=9, qmin=0)


def test_wrong_byte_count_rejected():
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), bits=4, qmin=-8, numel=4)
