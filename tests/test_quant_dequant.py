"""Our torch GGML dequantisers against the gguf package's own (``gguf.quants.dequantize``), bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from core.models.quant.ggml import GGML_TYPES, SUPPORTED_GGUF_TYPES, dequantize
from core.models.testing import GGUF_QUANTIZABLE, random_ggml_blocks

BLOCK_TYPES = [name for name in GGML_TYPES if name not in ("F32", "F16", "BF16")]


def _reference(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype]).copy())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit where finite, and NaN exactly where the reference has NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_block_table_is_ggml_s():
    for name, (type_id, block, type_size) in GGML_TYPES.items():
        ggml_type = gguf.GGMLQuantizationType[name]
        assert int(ggml_type) == type_id
        assert gguf.GGML_QUANT_SIZES[ggml_type] == (block, type_size)
    # the list, plus the types real Q4_0/Q3_K_S recipes mix in
    assert {"Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "BF16", "F16"} <= set(SUPPORTED_GGUF_TYPES)


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_random_valid_blocks_match_gguf(qtype):
    block = GGML_TYPES[qtype][1]
    shape = (12, 3 * 256)  # a multiple of every block size: 12 rows of 3 K-blocks / 24 small blocks
    raw = random_ggml_blocks(qtype, shape, seed=1, scale=0.02)
    ours = dequantize(raw, qtype, shape)
    ref = _reference(raw, qtype)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    assert torch.equal(ours, ref.reshape(shape)), f"{qtype}: max |diff| {(ours - ref).abs().max()}"
    assert shape[-1] % block == 0


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_every_bit_pattern_matches_gguf(qtype):
    """Fully random bytes, scale fields included (subnormal, inf and NaN scales): still the reference's
    values, NaN where it has NaN."""
    _, block, type_size = GGML_TYPES[qtype]
    generator = torch.Generator().manual_seed(2)
    raw = torch.randint(0, 256, (64, type_size), dtype=torch.uint8, generator=generator)
    ours = dequantize(raw, qtype, (64 * block,))
    with np.errstate(invalid="ignore", over="ignore"):
        ref = _reference(raw.reshape(1, -1), qtype).reshape(-1)
    assert _same(ours, ref)


@pytest.mark.parametrize("qtype", [q for q in GGUF_QUANTIZABLE if q != "BF16"])
def test_quantized_by_gguf_round_trips(qtype):
    """Real quantised data (gguf's quantiser on a weight-like tensor) decodes to gguf's values, close to the
    original."""
    weights = torch.randn(16, 256, generator=torch.Generator().manual_seed(3)) * 0.05
    packed = torch.from_numpy(gguf.quants.quantize(weights.numpy(), gguf.GGMLQuantizationType[qtype]))
    ours = dequantize(packed, qtype, weights.shape)
    assert torch.equal(ours, _reference(packed, qtype))
    assert (ours - weights).abs().max() < 0.2 * weights.abs().max()


def test_plain_types():
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(4))
    for qtype, dtype in [("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)]:
        raw = x.to(dtype).reshape(-1).view(torch.uint8)
        assert torch.equal(dequantize(raw, qtype, x.shape), x.to(dtype).float())
    bf16 = torch.from_numpy(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.BF16))
    assert torch.equal(dequantize(bf16, "BF16", x.shape), _reference(bf16, "BF16"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype_is_the_rounded_fp32_result(dtype):
    raw = random_ggml_blocks("Q4_K", (4, 256), seed=5)
    assert torch.equal(dequantize(raw, "Q4_K", (4, 256), dtype), dequantize(raw, "Q4_K", (4, 256)).to(dtype))


def test_size_and_type_errors():
    raw = random_ggml_blocks("Q8_0", (2, 64))
    with pytest.raises(ValueError, match="cannot hold a tensor of shape"):
        dequantize(raw, "Q8_0", (2, 96))
    with pytest.raises(ValueError, match="unsupported GGML type 'IQ2_XXS'; supported: F32, F16"):
        dequantize(raw, "IQ2_XXS", (2, 64))
