"""A LoRA file's keys -> (module name, part): the one place that knows every format's key suffixes.

Stdlib only, so the batch runner can check a LoRA against a checkpoint from the two headers alone.

| format | parts of one module (key = module + suffix) |
| --- | --- |
| kohya LoRA / LoCon | ``.lora_down.weight``, ``.lora_up.weight``, ``.lora_mid.weight`` (Tucker core), ``.alpha`` |
| PEFT / diffusers | ``.lora_A.weight``, ``.lora_B.weight`` (``.lora_A.default.weight``, bare ``.lora_A``) |
| old diffusers | ``.processor.to_q_lora.down.weight``, ``.lora_linear_layer.up.weight``, ``.lora.down.weight`` |
| XLabs (Flux) | ``.processor.qkv_lora1.down.weight``, ``.up.weight`` |
| LyCORIS LoHa | ``.hada_w1_a``, ``.hada_w1_b``, ``.hada_w2_a``, ``.hada_w2_b``, ``.hada_t1``, ``.hada_t2`` |
| LyCORIS LoKr | ``.lokr_w1`` or ``.lokr_w1_a``/``_b``, ``.lokr_w2`` or ``.lokr_w2_a``/``_b``, ``.lokr_t2`` |
| full diff | ``.diff`` (weight), ``.diff_b`` (bias) |
| DoRA | ``.dora_scale`` (kohya/LyCORIS), ``.lora_magnitude_vector`` (PEFT) |
"""

from __future__ import annotations

from collections.abc import Iterable

# suffix -> part, longest first so ".lora_A.default.weight" wins over ".weight"-less forms
SUFFIXES: tuple[tuple[str, str], ...] = tuple(sorted({
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_A": "down",
    ".lora_B": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".down.weight": "down",  # XLabs Flux: "double_blocks.0.processor.qkv_lora1.down.weight"
    ".up.weight": "up",
    ".alpha": "alpha",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.default": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}.items(), key=lambda kv: -len(kv[0])))

# old diffusers attention-processor LoRAs: ".processor.to_q_lora" patches ".to_q" (UNet) / ".q_proj" (CLIP)
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_CLIP = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_WRAPPERS = ("base_model.model.",)


def normalise_module(name: str, suffix: str) -> str:
    """The module a key's prefix names, in the spelling the key maps look up."""
    for wrapper in _WRAPPERS:
        if name.startswith(wrapper):
            name = name[len(wrapper) :]
    for infix in (".base_model.model.",):
        name = name.replace(infix, ".")
    if suffix.startswith("_lora."):  # "...attn1.processor.to_q" + "_lora.down.weight"
        head, _, attr = name.rpartition(".")
        head = head.removesuffix(".processor")
        table = _PROCESSOR_CLIP if "text_model" in head or head.startswith("text_encoder") else _PROCESSOR_UNET
        name = f"{head}.{table.get(attr, attr)}"
    return name


def split_key(key: str) -> tuple[str, str] | None:
    """``key`` -> (module name, part), or None for a key of no known format."""
    for suffix, part in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return normalise_module(key[: -len(suffix)], suffix), part
    return None


def group_keys(keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """({module: {part: key}}, keys of no known format)."""
    modules: dict[str, dict[str, str]] = {}
    stray: list[str] = []
    for key in keys:
        found = split_key(key)
        if found is None:
            stray.append(key)
            continue
        module, part = found
        modules.setdefault(module, {})[part] = key
    return modules, stray


def module_kind(parts: Iterable[str]) -> str | None:
    """lora | loha | lokr | full, or None when the parts make no complete module (a DoRA magnitude rides
    on the module's factors: ``dora_scale`` / ``magnitude`` parts)."""
    parts = set(parts)
    if {"down", "up"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "loha"
    if ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts) and (
        "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    ):
        return "lokr"
    if "diff" in parts or "diff_b" in parts:
        return "full"
    return None
