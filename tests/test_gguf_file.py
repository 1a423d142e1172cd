"""GGUF files: what ``GGUFFile`` lists and serves (torch-order shapes, no copies), a quantised network loaded
from one against the gguf package's dequantisation, and every bad file as one sentence naming it."""

from __future__ import annotations

import struct
import warnings

import gguf
import pytest
import torch
from torch import nn

from core.errors import CheckpointError
from core.models.gguf_file import GGUFFile, is_gguf
from core.models.quant import QuantizedLinear, QuantizedTensor, assign_weights, module_bytes
from core.models.testing import write_random_gguf


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Flux-like slice: a quantised double-block linear, an unquantised embedder (img_in stays F16/F32 in
    real files), a norm scale."""
    g = torch.Generator().manual_seed(seed)
    return {
        "img_in.weight": torch.randn(256, 64, generator=g) * 0.1,
        "img_in.bias": torch.randn(256, generator=g) * 0.1,
        "double_blocks.0.img_attn.qkv.weight": torch.randn(768, 256, generator=g) * 0.05,
        "double_blocks.0.img_attn.qkv.bias": torch.randn(768, generator=g) * 0.1,
        "double_blocks.0.img_attn.norm.query_norm.scale": 1 + 0.1 * torch.randn(64, generator=g),
        "double_blocks.0.img_mlp.0.weight": torch.randn(512, 768, generator=g) * 0.05,
    }


QTYPES = {
    "img_in.weight": "F16",
    "double_blocks.0.img_attn.qkv.weight": "Q8_0",
    "double_blocks.0.img_mlp.0.weight": "Q4_K",
}


def _reference(path, name: str) -> torch.Tensor:
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(t.data, t.tensor_type).copy()
    return torch.from_numpy(values).reshape(tuple(int(d) for d in reversed(t.shape.tolist())))


def test_lists_tensors_in_torch_order_and_serves_them_without_copies(tmp_path):
    path = write_random_gguf(tmp_path / "flux1-dev-Q4_K_S.gguf", _weights(), QTYPES)
    assert is_gguf(path) and not is_gguf(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "NumPy array is not writable" warning either
        f = GGUFFile(path)
        qkv = f.get("double_blocks.0.img_attn.qkv.weight")
    assert f.architecture == "flux" and f.format == "gguf"
    assert f.shapes["img_in.weight"] == (256, 64)  # GGUF stores (64, 256)
    assert f.tensors["double_blocks.0.img_mlp.0.weight"].qtype == "Q4_K"
    assert f.dtypes["img_in.weight"] == "float16" and f.dtypes["img_in.bias"] == "float32"
    assert f.dtypes["double_blocks.0.img_attn.qkv.weight"] == "Q8_0"
    assert f.qtype_counts() == {"F16": 1, "F32": 3, "Q8_0": 1, "Q4_K": 1}
    assert f.quantization() == "Q4_K"

    assert isinstance(qkv, QuantizedTensor) and qkv.shape == (768, 256) and qkv.raw.shape == (768, 8 * 34)
    mapped = f._reader.tensors[f.tensors["double_blocks.0.img_attn.qkv.weight"].index].data
    assert qkv.raw.data_ptr() == mapped.ctypes.data  # a view of the memory map, not a copy
    img_in = f.get("img_in.weight")
    assert img_in.dtype == torch.float16 and img_in.shape == (256, 64)
    for name in _weights():
        t = f.get(name)
        ours = t.dequantize() if isinstance(t, QuantizedTensor) else t.float()
        assert torch.equal(ours, _reference(path, name)), name
    assert torch.equal(_reference(path, "img_in.weight"), _weights()["img_in.weight"].half().float())


class Slice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img_in = nn.Linear(64, 256)
        self.qkv = nn.Linear(256, 768)
        self.query_norm = nn.RMSNorm(64)
        self.mlp = nn.Linear(768, 512, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.qkv(self.img_in(x))
        q = self.query_norm(h[..., :64])
        return torch.cat([q, self.mlp(h)], dim=-1)


RENAME = {
    "img_in.weight": "img_in.weight",
    "img_in.bias": "img_in.bias",
    "double_blocks.0.img_attn.qkv.weight": "qkv.weight",
    "double_blocks.0.img_attn.qkv.bias": "qkv.bias",
    "double_blocks.0.img_attn.norm.query_norm.scale": "query_norm.weight",
    "double_blocks.0.img_mlp.0.weight": "mlp.weight",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_network_from_gguf_matches_gguf_dequantised_weights(tmp_path, dtype):
    path = write_random_gguf(tmp_path / "slice.gguf", _weights(1), QTYPES)
    f = GGUFFile(path)
    model = Slice().to("meta")
    swapped = assign_weights(model, {RENAME[n]: t for n, t in f.items()}, dtype=dtype)
    assert sorted(swapped) == ["mlp", "qkv"]
    assert isinstance(model.qkv, QuantizedLinear) and type(model.img_in) is nn.Linear
    assert model.img_in.weight.dtype == dtype and model.query_norm.weight.dtype == dtype

    reference = Slice().to(dtype)
    reference.load_state_dict({RENAME[n]: _reference(path, n).to(dtype) for n in RENAME})
    x = torch.randn(2, 7, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # the packed weights are held at their file size: 768 rows of 8 Q8_0 blocks, 512 rows of 3 Q4_K blocks
    packed = 768 * 8 * 34 + 512 * 3 * 144
    plain = (256 * 64 + 256 + 768 + 64) * dtype.itemsize
    assert module_bytes(model) == packed + plain


def test_t5_names_and_diffusion_prefix(tmp_path):
    t5 = {
        "token_embd.weight": torch.randn(32, 64),
        "enc.blk.0.attn_q.weight": torch.randn(64, 64),
        "enc.blk.0.attn_rel_b.weight": torch.randn(32, 4),
        "enc.blk.0.ffn_gate.weight": torch.randn(128, 64),
        "enc.blk.11.ffn_norm.weight": torch.randn(64),
        "enc.output_norm.weight": torch.randn(64),
    }
    f = GGUFFile(write_random_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", t5, {}, arch="t5encoder"))
    f.check_architecture({"t5", "t5encoder"}, "a T5-XXL text encoder")
    assert sorted(f.state_names().values()) == [
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        "encoder.block.11.layer.1.layer_norm.weight",
        "encoder.final_layer_norm.weight",
        "shared.weight",
    ]
    flux = GGUFFile(write_random_gguf(tmp_path / "p.gguf", {"model.diffusion_model.img_in.bias": torch.ones(4)}, {}))
    assert flux.state_names() == {"model.diffusion_model.img_in.bias": "img_in.bias"}


def test_orig_shape_metadata(tmp_path):
    """ComfyUI-GGUF reshapes SD convs to (n/256, 256) before quantising and records the real shape."""
    conv = torch.randn(4, 64, 3, 3)  # 2304 values = 9 rows of 256
    path = write_random_gguf(
        tmp_path / "sdxl.gguf",
        {"conv.weight": conv.reshape(9, 256)},
        {"conv.weight": "Q8_0"},
        arch="sdxl",
        metadata={"comfy.gguf.orig_shape.conv.weight": [4, 64, 3, 3]},
    )
    f = GGUFFile(path)
    assert f.shapes["conv.weight"] == (4, 64, 3, 3)
    t = f.get("conv.weight")
    assert torch.equal(t.dequantize(), _reference(path, "conv.weight").reshape(4, 64, 3, 3))


# --------------------------------------------------------------------------------------------- bad files


def _message(path) -> str:
    with pytest.raises(CheckpointError) as info:
        GGUFFile(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message and "Traceback" not in message
    return message


def _tensor_type_offset(path, name: str) -> int:
    reader = gguf.GGUFReader(path)
    field = next(t for t in reader.tensors if t.name == name).field
    return field.offset + sum(int(part.nbytes) for part in field.parts[:4])  # name len, name, n_dims, dims


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\x00" * 64)  # a safetensors header
    assert "is not a GGUF file (it starts with b'\\x08\\x00\\x00\\x00'" in _message(fake)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "the file is empty or truncated" in _message(empty)
    assert "cannot be opened" in _message(tmp_path / "missing.gguf")
    assert "cannot be opened" in _message(tmp_path)


@pytest.mark.parametrize("keep", [0.97, 0.6, 0.05])
def test_truncated(tmp_path, keep):
    path = write_random_gguf(tmp_path / "flux.gguf", _weights(), QTYPES)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert "the GGUF file is damaged or truncated" in _message(path)


def test_unknown_and_unsupported_tensor_types(tmp_path):
    path = write_random_gguf(tmp_path / "flux.gguf", _weights(), QTYPES)
    offset = _tensor_type_offset(path, "double_blocks.0.img_mlp.0.weight")  # the last tensor: Q4_K
    data = bytearray(path.read_bytes())

    data[offset : offset + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    message = _message(path)
    assert "GGML type id 99" in message and "supported types: F32, F16" in message and "Q4_K" in message

    # IQ2_XXS (66 bytes per 256 values) is a real type, smaller than Q4_K, so the file still parses
    data[offset : offset + 4] = int(gguf.GGMLQuantizationType.IQ2_XXS).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    message = _message(path)
    assert "tensor 'double_blocks.0.img_mlp.0.weight' is stored as GGML type IQ2_XXS" in message
    assert "Darkroom cannot dequantise; supported types: F32, F16, Q4_0" in message


def test_gguf_of_another_model(tmp_path):
    llm = GGUFFile(write_random_gguf(tmp_path / "Llama-3-8B-Q4_K_M.gguf", {"blk.0.attn_q.weight": torch.randn(4, 32)}, {}, arch="llama"))
    with pytest.raises(CheckpointError) as info:
        llm.check_architecture({"flux"}, "a Flux diffusion model")
    assert str(info.value) == (
        f"{tmp_path / 'Llama-3-8B-Q4_K_M.gguf'}: this GGUF is a language model or text encoder for llama.cpp "
        "(architecture 'llama'), not a Flux diffusion model, whose GGUF files have architecture 'flux'"
    )
    flux = GGUFFile(write_random_gguf(tmp_path / "flux.gguf", _weights(), QTYPES))
    flux.check_architecture({"flux"}, "a Flux diffusion model")
    with pytest.raises(CheckpointError, match=r"this GGUF is an image model \(architecture 'flux'\), not a T5"):
        flux.check_architecture({"t5", "t5encoder"}, "a T5-XXL text encoder")
    hostile = GGUFFile(write_random_gguf(tmp_path / "x.gguf", {"a": torch.ones(2)}, {}, arch="\x1b[31mred"))
    with pytest.raises(CheckpointError) as info:
        hostile.check_architecture({"flux"}, "a Flux diffusion model")
    assert "\x1b" not in str(info.value) and "'\\x1b[31mred'" in str(info.value)


def _header(version: int = 3, n_tensors: int = 0, fields: bytes = b"", n_fields: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_fields) + fields + b"\0" * 8


def _field(key: bytes, kind: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", kind) + payload


@pytest.mark.parametrize(
    "data, expected",
    [
        (_header(version=1), "is a GGUF version 1 file; Darkroom reads versions 2 and 3"),
        (b"GGUF\x03\x00", "the version runs past the end of the file"),
        (_header(n_tensors=2**63, n_fields=0), "declares 9223372036854775808 tensors"),
        (_header(n_fields=2**62), "declares 0 tensors and 4611686018427387904 fields"),
        # an array of 2**61 INT32: gguf's reader would loop over it element by element, for ever
        (_header(fields=_field(b"general.x", 9, struct.pack("<IQ", 5, 2**61))), "metadata field b'general.x' runs past"),
        (_header(fields=_field(b"tok", 9, struct.pack("<IQ", 8, 2**40))), "declares 1099511627776 items"),
        (_header(fields=_field(b"k", 8, struct.pack("<Q", 2**60) + b"abc")), "metadata field b'k' runs past"),
        (_header(fields=_field(b"k", 77, b"\0" * 8)), "metadata field b'k' has an unknown value type 77"),
        (_header(fields=_field(b"\xff\xfe", 4, b"\0" * 4)), "damaged or truncated"),
    ],
)
def test_hostile_headers(tmp_path, data, expected):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    assert expected in _message(path)


def test_t5_names_cover_transformers_t5_encoder():
    """gguf's own T5-encoder tensor names, mapped, are exactly transformers' T5EncoderModel keys (its tied
    ``encoder.embed_tokens`` aside); relative_attention_bias lives in block 0 only, as in both."""
    from transformers import T5Config, T5EncoderModel

    from core.models.gguf_file import t5_name

    config = T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu")
    expected = set(T5EncoderModel(config).state_dict()) - {"encoder.embed_tokens.weight"}
    names = {"token_embd.weight", "enc.output_norm.weight", "enc.blk.0.attn_rel_b.weight"}
    for template in (gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.T5ENCODER]):
        if template.startswith("enc.blk.") and not template.endswith("attn_rel_b"):
            names |= {template.format(bid=b) + ".weight" for b in range(2)}
    assert {t5_name(n) for n in names} == expected
