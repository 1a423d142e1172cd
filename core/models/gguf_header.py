"""The header of a GGUF file read with the stdlib: architecture, tensor names, torch-order shapes, GGML types.

The model registry classifies files on the UI thread, where torch, numpy and the ``gguf`` package are not
imported; ``core.models.gguf_file`` (torch + gguf) is the loader. Both name tensors the same way
(``state_name``): llama.cpp's T5 names become Hugging Face's, and a diffusion model's
``model.diffusion_model.`` prefix is dropped, so detection sees the layout our networks load.

Every count and length in the header is checked against the bytes left before it is used, so a damaged or
hostile file costs at most one pass over its header (quantized-weights.md §1.1 for the layout).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from core.errors import CheckpointError
from core.models.safetensors_header import short_repr

GGUF_MAGIC = b"GGUF"

# general.architecture values (ComfyUI-GGUF's lists): image models, and text models llama.cpp writes.
IMAGE_ARCHITECTURES = frozenset(
    {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2", "qwen_image"}
)
T5_ARCHITECTURES = frozenset({"t5", "t5encoder"})
# stable-diffusion.cpp writes no architecture; ComfyUI-GGUF's converter once wrote "pig"/"cow".
COMPAT_ARCHITECTURES = frozenset({"", "pig", "cow"})

# llama.cpp's T5 tensor names -> Hugging Face T5EncoderModel names (substring replacements, in this order;
# ComfyUI-GGUF's T5_SD_MAP).
T5_NAME_MAP: tuple[tuple[str, str], ...] = (
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
)
# llama.cpp's decoder names -> Hugging Face's (Qwen3ForCausalLM, as ComfyUI's qwen_3_4b.safetensors stores them;
# ComfyUI-GGUF's LLAMA_SD_MAP, substring replacements in this order). Qwen files need no RoPE row un-permuting
# (only arch "llama" would, which is not mapped here).
LLAMA_NAME_MAP: tuple[tuple[str, str], ...] = (
    ("blk.", "model.layers."),
    ("attn_norm", "input_layernorm"),
    ("attn_q_norm.", "self_attn.q_norm."),
    ("attn_k_norm.", "self_attn.k_norm."),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output.weight", "lm_head.weight"),
)
# general.architecture -> the name map of its text-encoder files (image models keep checkpoint names)
NAME_MAPS: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(T5_ARCHITECTURES, T5_NAME_MAP),
    "qwen3": LLAMA_NAME_MAP,
}
DIFFUSION_PREFIXES = ("model.diffusion_model.",)

# GGML type id -> name, for the types Darkroom can read (core.models.quant.ggml.GGML_TYPES has the same ids).
GGML_TYPE_IDS = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
                 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
# The names the loader's other sources give dtypes: torch names for the plain float types.
_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# GGUF metadata value types -> size in bytes; 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9
_ORIG_SHAPE = "comfy.gguf.orig_shape."


def mapped_name(name: str, mapping: tuple[tuple[str, str], ...]) -> str:
    for old, new in mapping:
        name = name.replace(old, new)
    return name


def t5_name(name: str) -> str:
    return mapped_name(name, T5_NAME_MAP)


def strip_diffusion_prefix(name: str) -> str:
    for prefix in DIFFUSION_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def state_name(name: str, architecture: str | None) -> str:
    """A GGUF tensor name -> its name in the checkpoint layout our networks load."""
    mapping = NAME_MAPS.get(architecture or "")
    return mapped_name(name, mapping) if mapping else strip_diffusion_prefix(name)


def damaged(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(path, f"the GGUF file is damaged or truncated ({detail}); re-download or re-convert it")


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    architecture: str | None
    shapes: dict[str, tuple[int, ...]]  # state name (see state_name) -> torch-order shape
    dtypes: dict[str, str]  # state name -> "float16"/"bfloat16"/"float32" or a GGML type name ("Q4_K")
    unsupported: dict[str, int]  # file tensor name -> GGML type id Darkroom cannot dequantise

    @property
    def quantization(self) -> str:
        """The type holding most of the weights (by element count): ``"Q4_K"``, ``"float16"``, ..."""
        counts: dict[str, int] = {}
        for name, dtype in self.dtypes.items():
            counts[dtype] = counts.get(dtype, 0) + math.prod(self.shapes[name])
        return max(counts, key=counts.__getitem__) if counts else "empty"


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's header (no tensor data); CheckpointError for anything that is not a sound GGUF."""
    path = Path(path)
    try:
        total = path.stat().st_size
        budget = 1 << 20
        with open(path, "rb") as f:
            while True:  # most headers fit in 1 MB; a Qwen3 GGUF's tokenizer vocabulary takes a few MB
                f.seek(0)
                data = f.read(min(budget, total))
                try:
                    return _parse(path, data, complete=len(data) >= total)
                except _NeedMore:
                    budget *= 8
    except OSError as e:
        raise CheckpointError(path, f"cannot be opened ({e.strerror or e})") from None


class _NeedMore(Exception):
    """The header runs past the bytes read so far (but not past the end of the file)."""


def _parse(path: Path, data: bytes, *, complete: bool) -> GGUFHeader:
    if len(data) < 4:
        raise CheckpointError(path, "the file is empty or truncated (fewer than 4 bytes); it is not a GGUF file")
    if data[:4] != GGUF_MAGIC:
        raise CheckpointError(
            path, f"is not a GGUF file (it starts with {short_repr(data[:4])}, a GGUF file starts with b'GGUF')"
        )
    size = len(data)
    pos = 4

    def take(n: int, what: str) -> int:
        nonlocal pos
        if n < 0 or pos + n > size:
            if not complete and n >= 0:
                raise _NeedMore
            raise damaged(path, f"{what} runs past the end of the header at byte {pos}")
        start, pos = pos, pos + n
        return start

    def scalar(kind: int, what: str) -> object:
        return struct.unpack_from(_SCALAR_FORMATS[kind], data, take(_SCALAR_SIZES[kind], what))[0]

    def string(what: str) -> str:
        n = int(scalar(10, what))  # type: ignore[call-overload]
        start = take(n, what)
        return data[start : start + n].decode("utf-8", "replace")

    def value(kind: int, what: str, keep: bool, depth: int = 0) -> object:
        if kind in _SCALAR_SIZES:
            return scalar(kind, what)
        if kind == _STRING:
            return string(what)
        if kind == _ARRAY and depth < 4:
            item, count = int(scalar(4, what)), int(scalar(10, what))  # type: ignore[call-overload]
            if item in _SCALAR_SIZES:
                start = take(count * _SCALAR_SIZES[item], what)
                if not keep:
                    return None
                fmt = "<" + _SCALAR_FORMATS[item][1] * count
                return list(struct.unpack_from(fmt, data, start))
            if complete and count * 8 > size - pos:  # every string or nested array takes at least 8 bytes
                raise damaged(path, f"{what} declares {count} items, more than the file holds")
            return [value(item, what, keep, depth + 1) for _ in range(count)]
        raise damaged(path, f"{what} has an unknown value type {kind}")

    version = int(scalar(4, "the version"))  # type: ignore[call-overload]
    if version not in (2, 3):
        raise CheckpointError(path, f"is a GGUF version {version} file; Darkroom reads versions 2 and 3 (convert it again)")
    n_tensors, n_fields = int(scalar(10, "the tensor count")), int(scalar(10, "the field count"))  # type: ignore[call-overload]
    if complete and n_tensors * 28 + n_fields * 12 > size - pos:
        raise damaged(path, f"the header declares {n_tensors} tensors and {n_fields} fields, more than the file holds")
    fields: dict[str, object] = {}
    for i in range(n_fields):
        key = string(f"metadata field {i}")
        what = f"metadata field {short_repr(key)}"
        keep = key == "general.architecture" or key.startswith(_ORIG_SHAPE)
        result = value(int(scalar(4, what)), what, keep)  # type: ignore[call-overload]
        if keep:
            fields[key] = result
    arch = fields.get("general.architecture")
    architecture = arch if isinstance(arch, str) else None
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    unsupported: dict[str, int] = {}
    for i in range(n_tensors):
        name = string(f"tensor {i}'s name")
        what = f"tensor {short_repr(name)}"
        n_dims = int(scalar(4, what))  # type: ignore[call-overload]
        if n_dims > 8:
            raise damaged(path, f"{what} has {n_dims} dimensions")
        dims = [int(scalar(10, what)) for _ in range(n_dims)]  # type: ignore[call-overload]
        type_id = int(scalar(4, what))  # type: ignore[call-overload]
        take(8, what)  # data offset
        orig = fields.get(_ORIG_SHAPE + name)
        shape = tuple(orig) if isinstance(orig, list) and orig else tuple(reversed(dims))
        qtype = GGML_TYPE_IDS.get(type_id)
        if qtype is None:
            unsupported[name] = type_id
            continue
        state = state_name(name, architecture)
        shapes[state] = tuple(int(s) for s in shape)  # type: ignore[arg-type]
        dtypes[state] = _PLAIN.get(qtype, qtype)
    return GGUFHeader(path, architecture, shapes, dtypes, unsupported)
