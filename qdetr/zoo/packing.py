"""Bit-packing of integer weight codes into ``uint8`` storage.

Layout (one little-endian bit stream per tensor):

* every code ``q`` in ``[qmin, qmax]`` is stored as the unsigned offset ``u = q - qmin``
  in ``[0, 2^b - 1]`` (so signed and unsigned ranges pack alike);
* the codes of the flattened tensor (C order) are concatenated LSB first: code ``i`` takes
  stream bits ``[i*b, (i+1)*b)``, its least significant bit first; stream bit ``j`` is bit
  ``j % 8`` (value ``2^(j % 8)``) of byte ``j // 8``;
* the last byte is zero-padded. ``n`` codes take ``ceil(n*b / 8)`` bytes.

This gives the usual containers: 8 codes per byte at 1 bit, four 2-bit codes per byte
(code 0 in bits 0-1), two 4-bit codes per byte (code 0 in the low nibble), one byte per
8-bit code; 3-bit codes pack 8 codes into 3 bytes (code 0 in bits 0-2 of byte 0, code 2
straddles bytes 0 and 1). Any width 1..8 uses the same rule.

Examples:
    >>> codes = torch.tensor([-8, 7, 0, -1], dtype=torch.int8)
    >>> packed = pack_codes(codes, bits=4, qmin=-8)
    >>> packed.tolist()                    # u = [0, 15, 8, 7] -> bytes 0xF0, 0x78
    [240, 120]
    >>> unpack_codes(packed, bits=4, qmin=-8, numel=4).tolist()
    [-8, 7, 0, -1]
"""

from __future__ import annotations

import math

import torch

__all__ = ["packed_num_bytes", "pack_codes", "unpack_codes"]


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8; got {bits!r}")


def packed_num_bytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, *, bits: int, qmin: int) -> torch.Tensor:
    """Pack integer codes into a little-endian bit stream.

    Args:
        codes: integer tensor of any shape, values in ``[qmin, qmin + 2^bits - 1]``.
        bits: bit width b, 1..8.
        qmin: smallest representable code (``-2^(b-1)`` signed, 0 unsigned).

    Returns:
        ``uint8`` tensor of shape ``(ceil(numel * bits / 8),)`` on the device of ``codes``.

    Raises:
        ValueError: non-integer codes or a code outside the range.

    Examples:
        >>> import torch
        >>> from qdetr.zoo import pack_codes
        >>> pack_codes(torch.tensor([1, 2, 3]), bits=2, qmin=0).tolist()  # 1 | 2 << 2 | 3 << 4
        [57]
        >>> pack_codes(torch.zeros(3, 5, dtype=torch.int8), bits=3, qmin=-4).shape  # ceil(15 * 3 / 8)
        torch.Size([6])
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor; got {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int32) - int(qmin)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2**bits - 1):
        raise ValueError(
            f"codes must lie in [{qmin}, {qmin + 2**bits - 1}] for {bits}-bit packing with qmin={qmin}; "
            f"got [{int(flat.min()) + qmin}, {int(flat.max()) + qmin}]"
        )
    unsigned = flat.to(torch.uint8)
    if 8 % bits == 0:  # fast path (1, 2, 4, 8 bits): whole codes per byte, same layout
        per_byte = 8 // bits
        pad = (-unsigned.numel()) % per_byte
        if pad:
            unsigned = torch.cat([unsigned, unsigned.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (unsigned.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((unsigned.unsqueeze(1) >> shifts) & 1).reshape(-1)  # (numel * b,) LSB first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return (stream.view(-1, 8) << byte_shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(
    packed: torch.Tensor,
    *,
    bits: int,
    qmin: int,
    numel: int,
    shape: tuple[int, ...] | torch.Size | None = None,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Inverse of :func:`pack_codes`, bit-exact.

    Args:
        packed: ``uint8`` tensor of shape ``(ceil(numel * bits / 8),)``.
        bits: bit width used for packing.
        qmin: the ``qmin`` used for packing.
        numel: number of codes stored.
        shape: optional output shape (its product must be ``numel``).
        dtype: integer dtype of the result.

    Returns:
        Codes ``u + qmin`` of shape ``shape`` (or ``(numel,)``).

    Raises:
        ValueError: wrong dtype or byte count.

    Examples:
        >>> import torch
        >>> from qdetr.zoo import pack_codes, unpack_codes
        >>> codes = torch.tensor([[-4, 3], [0, -1]])
        >>> packed = pack_codes(codes, bits=3, qmin=-4)
        >>> unpack_codes(packed, bits=3, qmin=-4, numel=4, shape=(2, 2)).tolist()
        [[-4, 3], [0, -1]]
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor; got {packed.dtype} {tuple(packed.shape)}")
    expected = packed_num_bytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{numel} codes of {bits} bits need {expected} bytes; got {packed.numel()}")
    if 8 % bits == 0:  # fast path (1, 2, 4, 8 bits)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        mask = (1 << bits) - 1
        unsigned = ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel]
    else:
        byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        stream = ((packed.unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[: numel * bits]
        shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
        unsigned = (stream.view(numel, bits) << shifts).sum(dim=1, dtype=torch.uint8)
    codes = unsigned.to(torch.int16).add_(int(qmin)).to(dtype)  # int16 holds every 1..8-bit code
    return codes.reshape(tuple(shape)) if shape is not None else codes
