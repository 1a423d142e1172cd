"""GGML block quantisations (the tensor types of GGUF files) dequantised in torch.

A quantised tensor is a sequence of fixed-size blocks running along its innermost axis (each row of a
``[out, in]`` Linear weight is ``in / QK`` blocks). Each decoder below takes the raw bytes viewed as
``(n_blocks, type_size)`` uint8 and returns ``(n_blocks, QK)`` float32, vectorised over all blocks at once, so a
layer is dequantised by a handful of tensor ops on whatever device holds it. The arithmetic is done in float32
in the same order as ggml's reference (``gguf.quants``), so results are bit-identical to it; the caller then
casts to the compute dtype.

Every scale field (``d``, ``dmin``, ``m``) is an IEEE float16, little-endian. Byte offsets in the comments are
within one block. Layouts: ggml's ``block_*`` structs (``ggml-common.h``); ``tests/test_quant_dequant.py``
checks every decoder against ``gguf.quants.dequantize`` on random blocks.

The table of block sizes is written out here (format constants; the test checks it against
``gguf.GGML_QUANT_SIZES``) so that fp8-only models never import gguf and numpy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

# name -> (ggml type id, values per block, bytes per block)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
}
GGML_TYPE_NAMES = {type_id: name for name, (type_id, _, _) in GGML_TYPES.items()}
SUPPORTED_GGUF_TYPES: tuple[str, ...] = tuple(GGML_TYPES)
UNQUANTIZED = frozenset({"F32", "F16", "BF16"})

_F32 = torch.float32


def qtype_size(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type name."""
    _, block, type_size = GGML_TYPES[qtype]
    return block, type_size


def packed_nbytes(qtype: str, numel: int) -> int:
    block, type_size = qtype_size(qtype)
    return numel // block * type_size


def _f16(cols: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32: one little-endian float16 field per block."""
    return cols.contiguous().view(torch.float16).to(_F32)


@functools.lru_cache(maxsize=64)
def _shifts(values: tuple[int, ...], device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcastable shift amounts, made once per device: creating them per call would be a host-to-device
    copy, and a stall, in every layer's forward on a GPU."""
    return torch.tensor(values, dtype=torch.uint8, device=device).reshape(shape)


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Split ``qs`` (n, groups*32) into 4-bit values (n, 2*groups, 32): for each 32-byte group, first the 32 low
    nibbles, then the 32 high nibbles (the order every 4-bit ggml type stores its elements in)."""
    n = qs.shape[0]
    q = qs.reshape(n, groups, 1, 32) >> _shifts((0, 4), qs.device, (1, 1, 2, 1))
    return (q & 0x0F).reshape(n, 2 * groups, 32)


def _bits(qh: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Bit planes of ``qh`` (n, width) bytes: (n, count, width), plane i = bit i of each byte."""
    n = qh.shape[0]
    planes = qh.reshape(n, 1, width) >> _shifts(tuple(range(count)), qh.device, (1, count, 1))
    return planes & 1


# ----------------------------------------------------------------------------------------- 32-value blocks


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # 34 bytes: [0:2] f16 d | [2:34] int8 qs[32];  y = d * qs
    d = _f16(b[:, 0:2])
    return b[:, 2:34].contiguous().view(torch.int8).to(_F32) * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # 18 bytes: [0:2] f16 d | [2:18] qs[16]; y[j] = d*((qs[j] & 15) - 8), y[j+16] = d*((qs[j] >> 4) - 8)
    d = _f16(b[:, 0:2])
    n = b.shape[0]
    qs = b[:, 2:18]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).reshape(n, 32)
    return d * (q.to(_F32) - 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # 20 bytes: [0:2] f16 d | [2:4] f16 m | [4:20] qs[16];  y = d * nibble + m (nibble order as Q4_0)
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    qs = b[:, 4:20]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1)
    return d * q.to(_F32) + m


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1 values 0..31: nibbles as Q4_0, bit 4 of element j is bit j of ``qh`` read as a little-endian
    u32 (byte j // 8, bit j % 8)."""
    high = _bits(qh, 8, 4).transpose(1, 2).reshape(-1, 32)  # element j = 8*byte + bit
    low = torch.cat([qs & 0x0F, qs >> 4], dim=1)
    return low | (high << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # 22 bytes: [0:2] f16 d | [2:6] qh (u32 of high bits) | [6:22] qs[16];  y = d * (q - 16)
    d = _f16(b[:, 0:2])
    return d * (_five_bit(b[:, 2:6], b[:, 6:22]).to(_F32) - 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # 24 bytes: [0:2] f16 d | [2:4] f16 m | [4:8] qh | [8:24] qs[16];  y = d * q + m
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return d * _five_bit(b[:, 4:8], b[:, 8:24]).to(_F32) + m


# ----------------------------------------------------------------------------------------- K-quants (256)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 scale bytes -> 8 six-bit scales and 8 six-bit mins (n, 8) each.

    bytes 0-3: scale j (low 6 bits) + top 2 bits of scale j+4;  bytes 4-7: min j (low 6) + top 2 of min j+4;
    bytes 8-11: low nibble = low 4 bits of scale j+4, high nibble = low 4 bits of min j+4  (j = 0..3).
    """
    sc_lo, mn_lo, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat([sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 2) & 0x30)], dim=1)
    minimum = torch.cat([mn_lo & 0x3F, (mixed >> 4) | ((mn_lo >> 2) & 0x30)], dim=1)
    return scale, minimum


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # 144 bytes: [0:2] f16 d | [2:4] f16 dmin | [4:16] scales (see _k_scale_min) | [16:144] qs[128]
    # 8 sub-blocks of 32: sub-block 2c is the low nibbles of qs[32c:32c+32], 2c+1 their high nibbles;
    # y = d*scale[s]*q - dmin*min[s]
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scale, minimum = _k_scale_min(b[:, 4:16])
    ds = (d * scale.to(_F32)).reshape(n, 8, 1)
    dm = (dmin * minimum.to(_F32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144], 4).to(_F32)
    return (ds * q - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # 176 bytes: [0:2] f16 d | [2:4] f16 dmin | [4:16] scales | [16:48] qh[32] | [48:176] qs[128]
    # as Q4_K, plus bit 4 of element l of sub-block s is bit s of qh[l]
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scale, minimum = _k_scale_min(b[:, 4:16])
    ds = (d * scale.to(_F32)).reshape(n, 8, 1)
    dm = (dmin * minimum.to(_F32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 48:176], 4) | (_bits(b[:, 16:48], 8, 32) << 4)
    return (ds * q.to(_F32) - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # 210 bytes: [0:128] ql (low 4 bits) | [128:192] qh (high 2 bits) | [192:208] int8 scales[16] | [208:210] f16 d
    # Two halves of 128 values, half h uses ql[64h:64h+64], qh[32h:32h+32]. Within a half, 32-value group g:
    # low bits = nibble g // 2 (low, then high) of ql[64h + 32*(g % 2) + l], high bits = (qh[32h + l] >> 2g) & 3.
    # 16 sub-blocks of 16 values each have their own scale; y = d * scale * (q - 32)
    n = b.shape[0]
    d = _f16(b[:, 208:210])
    ds = (d * b[:, 192:208].contiguous().view(torch.int8).to(_F32)).reshape(n, 16, 1)
    low = b[:, 0:128].reshape(n, 2, 1, 64) >> _shifts((0, 4), b.device, (1, 1, 2, 1))
    low = (low & 0x0F).reshape(n, 8, 32)
    high = b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))
    high = (high & 0x03).reshape(n, 8, 32)
    q = (low | (high << 4)).to(_F32) - 32
    return (ds * q.reshape(n, 16, 16)).reshape(n, 256)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    # 84 bytes: [0:16] scales (low nibble scale, high nibble min, per 16 values) | [16:80] qs (2 bits each)
    # | [80:82] f16 d | [82:84] f16 dmin.  Each 32-byte half of qs holds 4 groups of 32 values at bit shifts
    # 0, 2, 4, 6;  y = d*scale*q - dmin*min
    n = b.shape[0]
    scales = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(_F32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(_F32)).reshape(n, 16, 1)
    q = b[:, 16:80].reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))
    q = (q & 0x03).reshape(n, 16, 16).to(_F32)
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    # 110 bytes: [0:32] hmask | [32:96] qs (2 low bits each) | [96:108] scales (16 six-bit, offset 32) | [108:110] d
    # scale j (0..15, one per 16 values): low 4 bits = nibble j // 8 of byte j % 8, top 2 bits = bits
    # 2*(j // 4).. of byte 8 + j % 4.
    # q = low 2 bits (as Q2_K) minus 4 where the hmask bit is 0 (bit g of hmask[l] for group g);
    # y = d * (scale - 32) * q
    n = b.shape[0]
    d = _f16(b[:, 108:110])
    s = b[:, 96:108]
    low = (s[:, 0:8].reshape(n, 1, 8) >> _shifts((0, 4), b.device, (1, 2, 1))).reshape(n, 16)
    high = (s[:, 8:12].reshape(n, 1, 4) >> _shifts((0, 2, 4, 6), b.device, (1, 4, 1))).reshape(n, 16)
    scale = ((low & 0x0F) | ((high & 0x03) << 4)).to(_F32) - 32
    dl = (d * scale).reshape(n, 16, 1)
    ql = b[:, 32:96].reshape(n, 2, 1, 32) >> _shifts((0, 2, 4, 6), b.device, (1, 1, 4, 1))
    ql = (ql & 0x03).reshape(n, 16, 16)
    qh = (_bits(b[:, 0:32], 8, 32).reshape(n, 16, 16)) ^ 1
    q = ql.to(_F32) - (qh << 2).to(_F32)
    return (dl * q).reshape(n, 256)


_DECODERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(
    raw: torch.Tensor, qtype: str, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float tensor of logical (torch-order) ``shape`` that the GGML bytes ``raw`` (uint8, any shape, in
    file order) encode, in ``dtype``, on ``raw``'s device."""
    if qtype not in GGML_TYPES:
        raise ValueError(f"unsupported GGML type {qtype!r}; supported: {', '.join(SUPPORTED_GGUF_TYPES)}")
    numel = math.prod(shape)
    block, type_size = qtype_size(qtype)
    if raw.dtype != torch.uint8 or numel % block or raw.numel() != numel // block * type_size:
        raise ValueError(
            f"{qtype} data of {raw.numel()} bytes ({raw.dtype}) cannot hold a tensor of shape {list(shape)}"
        )
    flat = raw.reshape(-1)
    if qtype == "F32":
        return flat.view(torch.float32).reshape(shape).to(dtype)
    if qtype == "F16":
        return flat.view(torch.float16).reshape(shape).to(dtype)
    if qtype == "BF16":
        return flat.view(torch.bfloat16).reshape(shape).to(dtype)
    blocks = flat.reshape(-1, type_size)
    return _DECODERS[qtype](blocks).reshape(shape).to(dtype)
