"""Packed-weight layers and ``assign_weights``: same outputs as ordinary layers holding the dequantised (or
torch-upcast) weight, packed bytes as the only copy of the weight, everything else assigned normally."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.models.quant import (
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTensor,
    assign_weights,
    module_bytes,
    quantization_label,
)
from core.models.quant.ggml import dequantize
from core.models.quant.layers import packed_state
from core.models.testing import random_ggml_blocks

E4M3 = torch.float8_e4m3fn


class Tiny(nn.Module):
    """The kinds of tensors a Flux / T5 file has: linears with and without bias, a norm, an embedding, a raw
    parameter, a conv (GGUF SD files quantise convs)."""

    def __init__(self, width: int = 256, hidden: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, width)
        self.blocks = nn.ModuleList([nn.Linear(width, hidden), nn.Linear(hidden, width, bias=False)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 32)
        self.conv = nn.Conv2d(32, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = self.blocks[1](torch.nn.functional.gelu(self.blocks[0](x))) * self.gain
        x = self.head(self.norm(x))  # (b, t, 32)
        return self.conv(x.transpose(1, 2).unsqueeze(-1))


def _on_meta() -> Tiny:
    # built on the CPU and moved: initialising on meta imports torch._dynamo (seconds), which the loader's own
    # meta build skips
    return Tiny().to("meta")


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in Tiny().state_dict().items()}


def _reference(state: dict[str, torch.Tensor], dtype: torch.dtype) -> Tiny:
    model = Tiny().to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.eval()


IDS = torch.tensor([[1, 5, 7, 39], [0, 2, 2, 3]])


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "Q5_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_equals_linear_with_dequantized_weight(qtype, dtype):
    raw = random_ggml_blocks(qtype, (64, 512), seed=7)
    bias = torch.randn(64)
    layer = QuantizedLinear(QuantizedTensor(raw, qtype, (64, 512)), bias, dtype=dtype)
    plain = nn.Linear(512, 64).to(dtype)
    plain.weight.data = dequantize(raw, qtype, (64, 512), dtype)
    plain.bias.data = bias.to(dtype)
    x = torch.randn(3, 5, 512).to(dtype)
    assert torch.equal(layer(x), plain(x))
    assert layer.weight.shape == (64, 512) and layer.weight.dtype == dtype
    assert layer.weight_raw.dtype == torch.uint8 and layer.weight_raw.data_ptr() == raw.data_ptr()


def test_quantized_conv_and_embedding_equal_plain_layers():
    conv = nn.Conv2d(32, 8, 3, padding=1, stride=2)
    raw = random_ggml_blocks("Q8_0", (8, 32 * 9))  # rows of 288 = 9 blocks of 32
    packed = QuantizedTensor(raw, "Q8_0", (8, 32, 3, 3))
    q = QuantizedConv2d(conv, packed, conv.bias.detach(), dtype=torch.float32)
    conv.weight.data = packed.dequantize()
    x = torch.randn(2, 32, 9, 9)
    assert torch.equal(q(x), conv(x))

    table = random_ggml_blocks("Q4_K", (40, 256), seed=3)
    emb = QuantizedEmbedding(QuantizedTensor(table, "Q4_K", (40, 256)), dtype=torch.bfloat16)
    full = dequantize(table, "Q4_K", (40, 256), torch.bfloat16)
    assert torch.equal(emb(IDS), full[IDS])


def _fp8_state(state: dict[str, torch.Tensor], scaled: bool) -> dict[str, torch.Tensor]:
    """What flux1-dev-fp8 (plain cast) and ComfyUI's *_fp8_scaled files (scale_weight per layer) hold."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        is_linear_weight = key.endswith(".weight") and value.dim() >= 2
        if not is_linear_weight:
            out[key] = value.to(torch.bfloat16)
        elif scaled:
            scale = value.abs().max() / 448
            out[key] = (value / scale).to(E4M3)
            out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value.to(E4M3)
    if scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    return out


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_model_matches_torch_upcast(scaled):
    state = _fp8_state(_random_state(), scaled)
    model = _on_meta()
    swapped = assign_weights(model, state, dtype=torch.bfloat16)
    assert sorted(swapped) == ["blocks.0", "blocks.1", "conv", "embed", "head"]

    # the reference: every fp8 weight upcast by torch (times its scale), in an ordinary network
    upcast = {}
    for key, value in state.items():
        if key.endswith(".scale_weight") or key == "scaled_fp8":
            continue
        w = value.to(torch.bfloat16)
        scale_key = key.removesuffix("weight") + "scale_weight"
        if scale_key in state:
            w = w * state[scale_key].item()
        upcast[key] = w
    reference = Tiny().to(torch.bfloat16)
    reference.load_state_dict(upcast)
    with torch.no_grad():
        assert torch.equal(model(IDS), reference(IDS))
    assert model.head.weight_raw.dtype == torch.uint8 and model.norm.weight.dtype == torch.bfloat16
    assert (model.head.weight_scale is not None) == scaled
    assert quantization_label(model) == "fp8"


def test_to_dtype_keeps_fp8_packed():
    model = _on_meta()
    assign_weights(model, _fp8_state(_random_state(), scaled=True), dtype=torch.bfloat16)
    before = module_bytes(model)
    model.to(torch.float32)  # casts every floating tensor: the fp8 bytes are uint8, so they stay
    assert model.head.weight_raw.dtype == torch.uint8
    assert module_bytes(model) == before + sum(p.numel() * 2 for p in model.parameters())
    assert model(IDS).dtype == torch.float32


def test_memory_held_fp8_and_q4_k_vs_bf16():
    """Exact byte counts of a Flux-like linear stack (widths a multiple of 256): fp8 is 1/2 of bf16 plus the
    bf16 biases, Q4_K 144 bytes per 256 weights = 0.28125x."""
    width, hidden = 256, 1024

    def stack() -> nn.Module:
        return nn.Sequential(nn.Linear(width, hidden), nn.Linear(hidden, width))

    weights = {"0.weight": (hidden, width), "1.weight": (width, hidden)}
    n_weights = 2 * width * hidden
    bias_bytes = (hidden + width) * 2
    g = torch.Generator().manual_seed(0)
    biases = {"0.bias": torch.randn(hidden, generator=g), "1.bias": torch.randn(width, generator=g)}

    bf16 = stack().to(torch.bfloat16)
    assert module_bytes(bf16) == n_weights * 2 + bias_bytes

    fp8 = stack().to("meta")
    assign_weights(fp8, {**{k: torch.randn(s).to(E4M3) for k, s in weights.items()}, **biases}, dtype=torch.bfloat16)
    assert module_bytes(fp8) == n_weights + bias_bytes

    q4 = stack().to("meta")
    packed = {k: QuantizedTensor(random_ggml_blocks("Q4_K", s), "Q4_K", s) for k, s in weights.items()}
    assign_weights(q4, {**packed, **biases}, dtype=torch.bfloat16)
    assert module_bytes(q4) == n_weights // 256 * 144 + bias_bytes
    assert (module_bytes(fp8) - bias_bytes) / (module_bytes(bf16) - bias_bytes) == 0.5
    assert (module_bytes(q4) - bias_bytes) / (module_bytes(bf16) - bias_bytes) == 0.28125
    assert quantization_label(q4) == "Q4_K" and quantization_label(bf16) == "bf16"


def test_gguf_style_mix_keeps_unquantized_tensors_normal():
    """A GGUF file keeps norms, biases, small tensors F32 and some weights F16/BF16; only Q* linears are
    packed, the rest become ordinary tensors in the compute dtype (including a Q8_0 raw parameter, which no
    layer can dequantise lazily)."""
    state = _random_state()
    tensors: dict[str, torch.Tensor | QuantizedTensor] = dict(state)
    tensors["blocks.0.weight"] = QuantizedTensor(random_ggml_blocks("Q4_K", (512, 256)), "Q4_K", (512, 256))
    tensors["blocks.1.weight"] = QuantizedTensor(random_ggml_blocks("Q6_K", (256, 512)), "Q6_K", (256, 512))
    tensors["gain"] = QuantizedTensor(random_ggml_blocks("Q8_0", (256,)), "Q8_0", (256,))
    tensors["embed.weight"] = state["embed.weight"].to(torch.float16)  # F16, as big F16 tensors stay
    tensors["head.weight"] = state["head.weight"].to(torch.bfloat16)
    model = _on_meta()
    swapped = assign_weights(model, tensors, dtype=torch.float32)
    assert swapped == ["blocks.0", "blocks.1"]
    assert type(model.embed) is nn.Embedding and model.embed.weight.dtype == torch.float32
    assert type(model.head) is nn.Linear and type(model.norm) is nn.LayerNorm and type(model.conv) is nn.Conv2d
    assert model.gain.dtype == torch.float32 and torch.equal(model.gain, tensors["gain"].dequantize())
    assert model.blocks[0].bias.dtype == torch.float32 and torch.equal(model.blocks[0].bias, state["blocks.0.bias"])
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])

    reference_state = dict(state)
    for key in ("blocks.0.weight", "blocks.1.weight", "gain"):
        reference_state[key] = tensors[key].dequantize()
    reference_state["embed.weight"] = tensors["embed.weight"].float()
    reference_state["head.weight"] = tensors["head.weight"].float()
    with torch.no_grad():
        assert torch.equal(model(IDS), _reference(reference_state, torch.float32)(IDS))
    assert set(packed_state(model)) == {"blocks.0.weight", "blocks.1.weight"}


def test_assign_errors_name_the_key():
    state = _random_state()
    packed = QuantizedTensor(random_ggml_blocks("Q8_0", (512, 512)), "Q8_0", (512, 512))
    with pytest.raises(ValueError, match=r"'blocks.0.weight' has shape \[512, 512\], the network expects \[512, 256\]"):
        assign_weights(_on_meta(), {**state, "blocks.0.weight": packed}, dtype=torch.float32)
    with pytest.raises(ValueError, match="'norm.bias' is missing"):
        assign_weights(_on_meta(), {k: v for k, v in state.items() if k != "norm.bias"}, dtype=torch.float32)
    with pytest.raises(ValueError, match="'extra.weight' is not part of the network"):
        assign_weights(_on_meta(), {**state, "extra.weight": torch.zeros(1)}, dtype=torch.float32)
    with pytest.raises(ValueError, match="'blocks.7.weight' is not part of the network"):
        assign_weights(_on_meta(), {**state, "blocks.7.weight": torch.zeros(2, 2).to(E4M3)}, dtype=torch.float32)
    with pytest.raises(ValueError, match="fp8 scale for 'head' has no fp8 weight"):
        assign_weights(_on_meta(), {**state, "head.scale_weight": torch.tensor(0.5)}, dtype=torch.float32)
    marker = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    with pytest.raises(ValueError, match="layer 'head' is quantised as 'nvfp4'; supported: float8_e4m3fn"):
        assign_weights(_on_meta(), {**state, "head.comfy_quant": marker}, dtype=torch.float32)


def test_packed_tensor_checks_its_size():
    with pytest.raises(ValueError, match=r"Q4_K tensor holds whole blocks of 256 values; shape \[1, 128\] does not"):
        QuantizedTensor(torch.zeros(144, dtype=torch.uint8), "Q4_K", (1, 128))
    with pytest.raises(ValueError, match=r"cannot hold shape \[2, 256\] \(288 bytes needed\)"):
        QuantizedTensor(torch.zeros(144, dtype=torch.uint8), "Q4_K", (2, 256))
    with pytest.raises(ValueError, match="unsupported weight type 'NF4'"):
        QuantizedTensor(torch.zeros(4, dtype=torch.uint8), "NF4", (8,))


def test_aux_keys_and_import_cost():
    from core.models.quant import is_quant_aux_key

    aux = ["scaled_fp8", "model.diffusion_model.scaled_fp8", "t5xxl.transformer.scaled_fp8", "a.scale_weight",
           "a.scale_input", "a.weight_scale", "a.input_scale", "a.comfy_quant"]
    assert all(is_quant_aux_key(k) for k in aux)
    assert not any(is_quant_aux_key(k) for k in ["a.weight", "a.bias", "final_layer.adaLN_modulation.1.weight",
                                                   "double_blocks.0.img_attn.norm.key_norm.scale"])
    # fp8 models do not need gguf (nor numpy, which torch itself imports when it is installed)
    import subprocess
    import sys

    code = "import sys, core.models.quant; print('gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_fp8_e5m2_and_every_e4m3_value():
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        every = torch.arange(256, dtype=torch.uint8).view(dtype)  # all 256 codes, NaNs and infinities included
        for compute in (torch.bfloat16, torch.float16, torch.float32):
            ours = QuantizedTensor.from_fp8(every).dequantize(compute)
            ref = every.to(compute)
            assert bool(((ours == ref) | (ours.isnan() & ref.isnan())).all()), (dtype, compute)
    scaled = QuantizedTensor.from_fp8(every.reshape(16, 16), scale=0.25)
    assert scaled.qtype == "F8_E5M2" and scaled.nbytes == 256
    assert torch.equal(scaled.dequantize(torch.float32).nan_to_num(), (every.reshape(16, 16).float() * 0.25).nan_to_num())
