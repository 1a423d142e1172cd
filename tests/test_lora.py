"""LoRAs: file formats, the SD1.x key map, merging and exact removal, tags and the request field, the prompt
cache, infotext hashes, and ``darkroom --batch`` against diffusers on the same checkpoint and LoRA files."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from core.errors import ModelNotFoundError, RequestError
from core.lora import LoraError
from core.lora.check import check_lora
from core.lora.files import LoraFileCache, read_lora
from core.lora.keymap import ldm_unet_to_diffusers
from core.lora.patch import activate
from core.lora.tags import LoraRef, prompt_loras, strip_tags
from core.models.registry import ModelRegistry
from core.models.safetensors_writer import save_tensors
from core.models.testing import random_lora_state_dict, write_random_checkpoint, write_random_lora
from core.pipeline import PipelineRunner, PromptCache, generate, load_model, placement_key
from core.request import GenerationRequest
from tests.reference import merge_lora_reference, psnr, reference_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder: a tiny fp32 SD1.x checkpoint and LoRAs of every format (nested, as people sort them)."""
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0, dtype=torch.float32)
    loras = root / "loras"
    write_random_lora(loras / "kohya.safetensors", fmt="kohya", seed=1)
    write_random_lora(loras / "styles" / "peft.safetensors", fmt="peft", seed=2, rank=8)
    write_random_lora(loras / "kohya_ldm.safetensors", fmt="kohya_ldm", seed=1)  # same tensors as kohya
    write_random_lora(loras / "unet_only.safetensors", fmt="kohya", seed=3, text_encoder=False)
    write_random_lora(loras / "te_only.safetensors", fmt="kohya", seed=4, unet=False, strength=1.0)
    for fmt in ("locon", "loha", "lokr"):
        write_random_lora(loras / f"{fmt}.safetensors", fmt=fmt, seed=5)
        write_random_lora(loras / f"{fmt}_tucker.safetensors", fmt=fmt, seed=6, tucker=True)
    return root


@pytest.fixture(scope="module")
def checkpoint(models) -> Path:
    return models / "checkpoints" / "tiny.safetensors"


@pytest.fixture
def model(checkpoint):
    return load_model(checkpoint, compute_hash=False)


def _find(models: Path):
    return ModelRegistry([models]).find_lora


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{role}.{k}": v for role, m in model.checkpoint.components.items() for k, v in m.state_dict().items()}


def request(**changes) -> GenerationRequest:
    base = GenerationRequest(model="tiny", prompt="a lighthouse at dusk", negative_prompt="blurry", steps=4,
                             seed=42, width=64, height=64)
    return base.replace(**changes)


# ---- tags and the request field ---------------------------------------------------------------------------


def test_tags_put_the_text_encoder_weight_first_and_are_removed_from_the_text():
    prompt = "a cat <lora:detail> <lora:ink:0.6>, <LyCO:soft:0.2:0.9> <lora:x:te=0.5:unet=0.25:dyn=4>"
    assert prompt_loras(prompt) == [
        LoraRef("detail", 1.0), LoraRef("ink", 0.6), LoraRef("soft", weight=0.9, te_weight=0.2),
        LoraRef("x", weight=0.25, te_weight=0.5),
    ]
    assert LoraRef("soft", weight=0.9, te_weight=0.2).te == 0.2
    assert strip_tags(prompt) == "a cat  ,  "


def test_request_loras_field_is_validated_and_round_trips():
    req = GenerationRequest.from_dict({"model": "m", "prompt": "<lora:a:0.5>",
                                       "loras": [{"name": "b", "weight": 0.7, "te_weight": 0.2}, {"name": "c"}]})
    assert req.lora_refs() == (LoraRef("b", 0.7, 0.2), LoraRef("c", 1.0), LoraRef("a", 0.5))
    again = GenerationRequest.from_dict(json.loads(json.dumps(req.to_dict())))
    assert again == req and again.prompt == "<lora:a:0.5>"  # the prompt keeps its tags
    with pytest.raises(RequestError, match=r"loras\[0\] .*'strength' is not a LoRA entry key"):
        GenerationRequest.from_dict({"model": "m", "loras": [{"name": "b", "strength": 1}]})
    with pytest.raises(RequestError, match=r"loras\[1\] .*weight: a number"):
        GenerationRequest.from_dict({"model": "m", "loras": [{"name": "b"}, {"name": "c", "weight": "x"}]})
    with pytest.raises(RequestError, match=r"prompt = .*<lora:a:strong>: 'strong' is not a number"):
        GenerationRequest(model="m", prompt="<lora:a:strong>")


# ---- the key map --------------------------------------------------------------------------------------------


def test_ldm_block_names_map_to_the_diffusers_ones_kohya_uses():
    # SD1.5 layout (2 res blocks per level), lora.md §3.1 table
    assert ldm_unet_to_diffusers("input_blocks.1.1.proj_in", 2) == "down_blocks.0.attentions.0.proj_in"
    assert ldm_unet_to_diffusers("input_blocks.1.0.in_layers.2", 2) == "down_blocks.0.resnets.0.conv1"
    assert ldm_unet_to_diffusers("input_blocks.3.0.op", 2) == "down_blocks.0.downsamplers.0.conv"
    assert ldm_unet_to_diffusers("middle_block.2.out_layers.3", 2) == "mid_block.resnets.1.conv2"
    assert ldm_unet_to_diffusers("output_blocks.2.1.conv", 2) == "up_blocks.0.upsamplers.0.conv"
    assert ldm_unet_to_diffusers("output_blocks.5.2.conv", 2) == "up_blocks.1.upsamplers.0.conv"
    assert ldm_unet_to_diffusers("output_blocks.5.1.proj_in", 2) == "up_blocks.1.attentions.2.proj_in"
    assert ldm_unet_to_diffusers("input_blocks.4.0.skip_connection", 2) == "down_blocks.1.resnets.0.conv_shortcut"


def test_ldm_and_diffusers_named_kohya_files_merge_identically(model, models):
    find, cache = _find(models), LoraFileCache()
    activate(model.loras, [LoraRef("kohya", 0.8)], find, cache)
    diffusers_named = _weights(model)
    activate(model.loras, [LoraRef("kohya_ldm", 0.8)], find, cache)
    ldm_named = _weights(model)
    assert model.loras.merged_weights == len(read_lora(models / "loras" / "kohya.safetensors").modules)
    assert all(torch.equal(diffusers_named[k], ldm_named[k]) for k in diffusers_named)


# ---- deltas against hand-computed ones -----------------------------------------------------------------------


def _hand_delta(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """LoCon / LoHa / LoKr deltas written out index by index (lora.md §1-2), independently of core/lora."""
    t = {k: v.double() for k, v in t.items()}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        r = down.shape[0]
        if "lora_mid.weight" in t:
            mid = t["lora_mid.weight"]
            d = torch.zeros(shape, dtype=torch.float64)
            for a in range(r):
                for b in range(r):
                    d += up[:, a, 0, 0][:, None, None, None] * mid[a, b][None, None] * down[b, :, 0, 0][None, :, None, None]
        else:
            d = torch.zeros(shape, dtype=torch.float64)
            for a in range(r):
                d += (up[:, a].reshape(-1, 1, 1, 1) if len(shape) == 4 else up[:, a, None]) * down[a][None]
        return d * (alpha / r if alpha else 1.0)
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            def factor(i):
                core, wa, wb = t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
                # R[o, n, y, x] = sum_a sum_b wa[a, o] core[a, b, y, x] wb[b, n]
                return sum(wa[a][:, None, None, None] * core[a, b][None, None] * wb[b][None, :, None, None]
                           for a in range(core.shape[0]) for b in range(core.shape[1]))
            d, r = factor(1) * factor(2), t["hada_w1_b"].shape[0]
        else:
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
            r = t["hada_w1_b"].shape[0]
        return d.reshape(shape) * (alpha / r if alpha else 1.0)
    w1 = t["lokr_w1"]
    if "lokr_t2" in t:
        core, wa, wb = t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
        w2 = sum(wa[a][:, None, None, None] * core[a, b][None, None] * wb[b][None, :, None, None]
                 for a in range(core.shape[0]) for b in range(core.shape[1]))
        r = wb.shape[0]
    else:
        wb = t["lokr_w2_b"]
        w2 = (t["lokr_w2_a"] @ wb.flatten(1)).reshape(t["lokr_w2_a"].shape[0], *wb.shape[1:])
        r = wb.shape[0]
    # Kronecker product by blocks: block (i, j) of size w2 is w1[i, j] * w2
    a, c = w1.shape
    b, dd = w2.shape[:2]
    d = torch.zeros((a * b, c * dd, *w2.shape[2:]), dtype=torch.float64)
    for i in range(a):
        for j in range(c):
            d[i * b : (i + 1) * b, j * dd : (j + 1) * dd] = w1[i, j] * w2
    return d.reshape(shape) * (alpha / r if alpha else 1.0)


@pytest.mark.parametrize("name", ["locon", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_tucker"])
def test_lycoris_deltas_equal_hand_computed_ones(model, models, name):
    path = models / "loras" / f"{name}.safetensors"
    from safetensors.torch import load_file

    raw = load_file(str(path))
    before = _weights(model)
    activate(model.loras, [LoraRef(name, 0.7)], _find(models), LoraFileCache())
    after = _weights(model)
    checked = set()
    for layer in ("unet.input_blocks.1.0.in_layers.2", "unet.output_blocks.0.0.out_layers.3",  # 3x3 convs
                  "unet.input_blocks.1.1.proj_in",  # 1x1 conv
                  "unet.middle_block.1.transformer_blocks.0.attn2.to_k", "text_encoder.text_model.encoder.layers.0.mlp.fc1"):
        role, module = layer.split(".", 1)
        lora_name = ("lora_unet_" + ldm_unet_to_diffusers(module, 1) if role == "unet" else "lora_te_" + module)
        lora_name = lora_name.replace(".", "_")
        parts = {k[len(lora_name) + 1 :]: v for k, v in raw.items() if k.startswith(lora_name + ".")}
        assert parts, lora_name
        key = f"{layer}.weight"
        expected = 0.7 * _hand_delta(parts, tuple(before[key].shape))
        assert torch.allclose((after[key].double() - before[key].double()), expected, rtol=1e-4, atol=1e-6), key
        checked.add(len(before[key].shape))
    assert checked == {2, 4}


# ---- merge, switch, remove ----------------------------------------------------------------------------------


def test_removing_loras_restores_every_weight_exactly_and_switching_remerges_only_what_changed(model, models):
    find, cache = _find(models), LoraFileCache()
    before = {k: v.clone() for k, v in _weights(model).items()}
    pointers = {k: v.data_ptr() for k, v in _weights(model).items()}
    activate(model.loras, [LoraRef("unet_only", 0.9)], find, cache)
    unet_weights = model.loras.merged_weights
    merges = []
    original = model.loras._merge
    model.loras._merge = lambda key, c, sig: (merges.append(key), original(key, c, sig))
    activate(model.loras, [LoraRef("unet_only", 0.9), LoraRef("te_only", 1.0)], find, cache)
    assert merges and all(role == "text_encoder" for role, _ in merges)  # the UNet kept its merge
    assert model.loras.merged_weights == unet_weights + len(merges)
    activate(model.loras, [LoraRef("peft", 0.5), LoraRef("locon_tucker", 1.2)], find, cache)
    assert any(not torch.equal(before[k], v) for k, v in _weights(model).items())
    activate(model.loras, [], find, cache)
    after = _weights(model)
    assert model.loras.merged_weights == 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(after[k].data_ptr() == pointers[k] for k in after)  # the original tensors themselves are back
    assert cache.reads == 4  # each file read once


def test_switching_back_puts_the_kept_merges_back_and_removing_all_frees_them(model, models, monkeypatch):
    """A merge buffer a switch takes off its weight is kept with what it holds: switching back to the previous
    set puts the same tensors back, nothing computed, and a third set writes into the oldest kept buffers
    (fresh memory would page-fault on every write) instead of allocating; with no LoRA left nothing is kept."""
    from core.lora.files import LoraModule

    find, cache = _find(models), LoraFileCache()
    plain = {k: v.data_ptr() for k, v in _weights(model).items()}
    activate(model.loras, [LoraRef("te_only", 1.0)], find, cache)
    first = {k: (v.data_ptr(), v.clone()) for k, v in _weights(model).items() if v.data_ptr() != plain[k]}
    activate(model.loras, [LoraRef("kohya", 0.5)], find, cache)  # the same text-encoder weights and the UNet's
    second = {k: v.data_ptr() for k, v in _weights(model).items() if v.data_ptr() != plain[k]}
    assert first and not set(second.values()) & {ptr for ptr, _ in first.values()}  # te_only's merges kept
    computed = []
    original = LoraModule.add_to
    monkeypatch.setattr(LoraModule, "add_to", lambda self, *a, **k: (computed.append(self.name), original(self, *a, **k)))
    activate(model.loras, [LoraRef("te_only", 1.0)], find, cache)
    after = _weights(model)
    assert computed == [] and all(after[k].data_ptr() == ptr and torch.equal(after[k], v) for k, (ptr, v) in first.items())
    assert all(after[k].data_ptr() == plain[k] for k in after if k not in first)
    activate(model.loras, [LoraRef("peft", 0.5)], find, cache)
    third = {v.data_ptr() for k, v in _weights(model).items() if v.data_ptr() != plain[k]}
    assert computed and third & set(second.values())  # kohya's kept buffers took the new merges
    activate(model.loras, [], find, cache)
    assert model.loras._spares == {} and model.loras.merged_weights == 0
    assert all(v.data_ptr() == plain[k] for k, v in _weights(model).items())


def test_on_a_full_gpu_a_switch_merges_in_place_instead_of_keeping_the_previous_set(model, models, monkeypatch):
    """Kept merges take new memory only while a quarter of a GPU's stays free (simulated: mem_get_info); else a
    switch writes the new merge into the buffer it takes off, as before, and removal is still exact."""
    from types import SimpleNamespace

    from core.lora import patch

    cuda = SimpleNamespace(device=torch.device("cuda"), nbytes=1 << 30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (12 << 30, 16 << 30))
    assert patch._may_allocate(cuda) and patch._may_allocate(torch.zeros(1))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 << 30, 16 << 30))
    assert not patch._may_allocate(cuda)

    find, cache = _find(models), LoraFileCache()
    plain = {k: v.clone() for k, v in _weights(model).items()}
    monkeypatch.setattr(patch, "_may_allocate", lambda like: False)
    activate(model.loras, [LoraRef("te_only", 1.0)], find, cache)
    first = {k: v.data_ptr() for k, v in _weights(model).items() if not torch.equal(v, plain[k])}
    activate(model.loras, [LoraRef("te_only", 0.5)], find, cache)
    second = {k: v.data_ptr() for k, v in _weights(model).items() if not torch.equal(v, plain[k])}
    assert first and second == first  # the same buffers, rewritten
    activate(model.loras, [], find, cache)
    assert all(torch.equal(v, plain[k]) for k, v in _weights(model).items())


def test_two_loras_add_their_deltas_in_any_order(model, models):
    find, cache = _find(models), LoraFileCache()
    before = _weights(model)
    deltas = {}
    for name, weight in (("kohya", 0.8), ("peft", -0.5)):
        activate(model.loras, [LoraRef(name, weight)], find, cache)
        deltas[name] = {k: v.double() - before[k].double() for k, v in _weights(model).items()}
    activate(model.loras, [LoraRef("kohya", 0.8), LoraRef("peft", -0.5)], find, cache)
    both = _weights(model)
    activate(model.loras, [LoraRef("peft", -0.5), LoraRef("kohya", 0.8)], find, cache)
    assert all(torch.equal(both[k], v) for k, v in _weights(model).items())  # rebuilt from the originals
    key = "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    expected = before[key].double() + deltas["kohya"][key] + deltas["peft"][key]
    assert torch.allclose(both[key].double(), expected, atol=1e-6)


def test_a_fp16_model_merges_in_fp32_and_casts_back(checkpoint, models):
    half = load_model(checkpoint, compute_hash=False, dtype=torch.float16)
    before = _weights(half)
    activate(half.loras, [LoraRef("kohya", 1.0)], _find(models), LoraFileCache())
    lora = read_lora(models / "loras" / "kohya.safetensors")
    key = "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_v"
    module = lora.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"]
    expected = (before[key + ".weight"].float() + module.delta(before[key + ".weight"].shape)).half()
    assert _weights(half)[key + ".weight"].dtype == torch.float16
    assert torch.equal(_weights(half)[key + ".weight"], expected)


# ---- text-encoder LoRAs and the prompt cache ----------------------------------------------------------------


def test_a_text_encoder_lora_changes_the_encoding_and_the_cache_keys_on_it(model, models):
    find, cache, prompts = _find(models), LoraFileCache(), PromptCache()
    plain = prompts.encode(model, "a lighthouse")
    activate(model.loras, [LoraRef("te_only", 1.0)], find, cache)
    with_lora = prompts.encode(model, "a lighthouse")
    assert prompts.misses == 2 and not torch.allclose(plain.context, with_lora.context, atol=1e-3)
    activate(model.loras, [LoraRef("te_only", 1.0, te_weight=0.0)], find, cache)  # te weight 0: plain text
    assert torch.equal(prompts.encode(model, "a lighthouse").context, plain.context) and prompts.hits == 1
    activate(model.loras, [LoraRef("unet_only", 1.0)], find, cache)  # a UNet LoRA keeps the cached text
    prompts.encode(model, "a lighthouse")
    assert prompts.hits == 2 and prompts.misses == 2


def test_generate_refuses_a_request_whose_loras_are_not_merged(model):
    with pytest.raises(ValueError, match="LoRAs merged first"):
        generate(model, request(prompt="a cat <lora:kohya:1>"))


# ---- errors and warnings ------------------------------------------------------------------------------------


def test_a_missing_lora_name_suggests_close_matches(models):
    runner = PipelineRunner([models])
    with pytest.raises(ModelNotFoundError, match="LoRA 'kohyaa' not found in .*close matches: kohya"):
        runner.apply_loras(runner.ensure_model(request()), request(prompt="<lora:kohyaa:1>"))
    assert runner.registry.find_lora("peft") == models / "loras" / "styles" / "peft.safetensors"  # recursive


def test_a_lora_for_another_family_is_one_error_naming_both(model, models, tmp_path, checkpoint):
    sdxl = save_tensors({
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
    }, tmp_path / "xl.safetensors")
    message = "LoRA 'xl' is an SDXL LoRA .*context width 2048.*but the model 'tiny' is SD1.x"
    with pytest.raises(LoraError, match=message):
        activate(model.loras, [LoraRef("xl")], lambda name: sdxl, LoraFileCache(), model="tiny")
    with pytest.raises(LoraError, match=message):
        check_lora(sdxl, checkpoint, "xl", "tiny")
    assert model.loras.merged_weights == 0


def test_unmatched_keys_are_counted_in_a_warning(model, models, tmp_path, checkpoint):
    tensors = random_lora_state_dict("sd15", "tiny", "kohya", seed=1)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    tensors["something_else"] = torch.zeros(1)
    path = save_tensors(tensors, tmp_path / "extra.safetensors")
    expected = f"LoRA 'extra': 3 of {len(tensors)} keys match no layer of the SD1.x model and were skipped"
    warnings = activate(model.loras, [LoraRef("extra")], lambda name: path, LoraFileCache())
    assert len(warnings) == 1 and warnings[0].startswith(expected)
    assert check_lora(path, checkpoint, "extra", "tiny")[0].startswith(expected)
    junk = save_tensors({"lora_unet_nothing.lora_down.weight": torch.zeros(4, 8),
                         "lora_unet_nothing.lora_up.weight": torch.zeros(8, 4)}, tmp_path / "junk.safetensors")
    with pytest.raises(LoraError, match="none of LoRA 'junk''s 2 keys match a layer of this SD1.x model"):
        activate(model.loras, [LoraRef("junk")], lambda name: junk, LoraFileCache())


def test_a_lora_written_twice_is_warned_about_once_and_merged_twice(model, tmp_path, checkpoint):
    """``<lora:extra:0.5> ... <lora:extra:0.5>``: one warning for its unmatched keys (the same keys), and both
    tags merged, as A1111 adds both: the weights are the LoRA's at 1.0."""
    tensors = random_lora_state_dict("sd15", "tiny", "kohya", seed=1)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    path = save_tensors(tensors, tmp_path / "extra.safetensors")
    refs = prompt_loras("<lora:extra:0.5> a lighthouse, <lora:extra:0.5>", "")
    assert refs == [LoraRef("extra", 0.5), LoraRef("extra", 0.5)]
    [warning] = activate(model.loras, refs, lambda name: path, LoraFileCache())
    assert warning.count("LoRA 'extra'") == 1 and "2 of" in warning
    twice = _weights(model)
    activate(model.loras, [LoraRef("extra", 1.0)], lambda name: path, LoraFileCache())
    once = _weights(model)
    assert all(torch.allclose(twice[k], once[k], atol=1e-6) for k in once)
    plain = _weights(load_model(checkpoint, compute_hash=False))
    assert any(not torch.equal(once[k], v) for k, v in plain.items())  # the LoRA did change the weights


def test_dora_magnitudes_are_applied_as_lycoris_and_peft_define_them(model, tmp_path):
    """kohya/LyCORIS ``dora_scale`` on the output axis ([out, 1, 1, 1], a 1x1 conv) and on the input axis
    ([1, in], a linear), PEFT ``lora_magnitude_vector`` [out]: merged weights against the formulas of
    lora.md §2.3 written out in float64 (the user's weight 0.6 on the ratio for LyCORIS, inside V for PEFT)."""
    before = _weights(model)
    conv = ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet.input_blocks.1.1.proj_in.weight")
    linear = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
    kohya = random_lora_state_dict("sd15", "tiny", "kohya", seed=1, text_encoder=False)
    g = torch.Generator().manual_seed(0)
    kohya[conv[0] + ".dora_scale"] = (torch.rand(32, 1, 1, 1, generator=g) + 0.5).half()
    kohya[linear[0] + ".dora_scale"] = (torch.rand(1, 32, generator=g) + 0.5).half()
    peft = random_lora_state_dict("sd15", "tiny", "peft", seed=2, text_encoder=False)
    peft_name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    peft[peft_name + ".lora_magnitude_vector"] = torch.rand(32, generator=g) + 0.5

    def lycoris(t, name, key, m):
        w = before[key].double()
        up, down = t[name + ".lora_up.weight"].double(), t[name + ".lora_down.weight"].double()
        v = w + float(t[name + ".alpha"]) / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        scale = t[name + ".dora_scale"].double()
        axis = 0 if scale.shape[0] != 1 else 1
        norm = v.transpose(0, axis).flatten(1).norm(dim=1)
        shape = [1] * v.ndim
        shape[axis] = -1
        ratio = scale.reshape(shape) / (norm.reshape(shape) + torch.finfo(torch.float32).eps)
        return v * (m * (ratio - 1) + 1)

    path = save_tensors(kohya, tmp_path / "dora.safetensors")
    assert set(read_lora(path).dora) == {conv[0], linear[0]}
    activate(model.loras, [LoraRef("dora", 0.6)], lambda n: path, LoraFileCache())
    after = _weights(model)
    for name, key in (conv, linear):
        assert torch.allclose(after[key].double(), lycoris(kohya, name, key, 0.6), rtol=1e-5, atol=1e-6), key

    path = save_tensors(peft, tmp_path / "dora_peft.safetensors")
    activate(model.loras, [LoraRef("dora_peft", 0.6)], lambda n: path, LoraFileCache())
    key = linear[1]
    a, b = peft[peft_name + ".lora_A.weight"].double(), peft[peft_name + ".lora_B.weight"].double()
    v = before[key].double() + 0.6 * (b @ a)
    expected = peft[peft_name + ".lora_magnitude_vector"].double()[:, None] * v / v.norm(dim=1, keepdim=True)
    assert torch.allclose(_weights(model)[key].double(), expected, rtol=1e-5, atol=1e-6)
    activate(model.loras, [], lambda n: path, LoraFileCache())
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())  # removed exactly, as any LoRA


# ---- hashes and infotext ------------------------------------------------------------------------------------


def test_a_pt_lora_loads_through_the_weights_only_unpickler(model, tmp_path):
    tensors = random_lora_state_dict("sd15", "tiny", "kohya", seed=1)
    torch.save(tensors, tmp_path / "old.pt")
    lora = read_lora(tmp_path / "old.pt")
    assert len(lora.modules) == len(tensors) // 3 and lora.sha256 == hashlib.sha256(
        (tmp_path / "old.pt").read_bytes()).hexdigest()  # A1111: a non-safetensors file hashes whole
    activate(model.loras, [LoraRef("old")], lambda name: tmp_path / "old.pt", LoraFileCache())
    assert model.loras.merged_weights == len(lora.modules)


def test_the_lora_hash_follows_a1111(tmp_path, models):
    path = models / "loras" / "kohya.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert read_lora(path).sha256 == hashlib.sha256(data[8 + n :]).hexdigest()  # tensor data only
    stamped = write_random_lora(tmp_path / "stamped.safetensors", seed=1, metadata={"sshs_model_hash": "AB" * 32})
    assert read_lora(stamped).shorthash == "ab" * 6


def test_batch_records_lora_hashes_and_keeps_the_prompt_as_written(models, tmp_path):
    from core.metadata import PARAMETERS_KEY

    req = request(prompt="a cat <lora:kohya:0.5>", loras=[{"name": "unet_only", "weight": 0.3}], steps=1)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(req.to_dict()))
    code, paths, err = _batch(models, jobs, tmp_path)
    assert code == 0, err
    text = Image.open(paths[0]).text[PARAMETERS_KEY]
    # the prompt as written, then the loras list as tags: what A1111's readers apply
    assert text.startswith("a cat <lora:kohya:0.5> <lora:unet_only:0.3>\n")
    h = {name: read_lora(models / "loras" / f"{name}.safetensors").shorthash for name in ("kohya", "unet_only")}
    assert f'Lora hashes: "unet_only: {h["unet_only"]}, kohya: {h["kohya"]}"' in text


def test_batch_names_a_missing_or_wrong_family_lora_before_running(models, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(request(prompt="<lora:kohja:1>", steps=1).to_dict()))
    code, _, err = _batch(models, jobs, tmp_path)
    assert code == 3 and "job 1: LoRA 'kohja' not found" in err and "close matches: kohya" in err, err


def _batch(models: Path, jobs: Path, tmp_path: Path) -> tuple[int, list[Path], str]:
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "--batch", str(jobs), "--models-dir", str(models),
         "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    return done.returncode, [Path(line) for line in done.stdout.splitlines()], done.stderr


# ---- against diffusers ----------------------------------------------------------------------------------------


def _diffusers_named(model) -> dict[str, torch.Tensor]:
    """Our merged UNet and text encoder under diffusers/transformers names (diffusers' own converter)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from core.models.unet import UNetConfig
    from tests.reference import UNET_PREFIX, diffusers_unet_config

    unet = {UNET_PREFIX + k: v for k, v in model.checkpoint.unet.state_dict().items()}
    config = diffusers_unet_config(UNetConfig.from_state_dict({k: v.shape for k, v in model.checkpoint.unet.state_dict().items()}))
    out = {"unet." + k: v for k, v in convert_ldm_unet_checkpoint(unet, config).items()}
    out.update({"text_encoder." + k.removeprefix("text_model."): v
                for k, v in model.checkpoint.text_encoder.state_dict().items()})
    return out


@pytest.mark.parametrize("lora,te,unet", [
    ("kohya", 0.8, 0.8),
    ("peft_config", 0.5, 1.2),  # a diffusers-saved PEFT file: alpha and rsLoRA from its adapter metadata
])
def test_merged_weights_equal_diffusers_merged_weights(checkpoint, models, tmp_path, lora, te, unet):
    path = models / "loras" / f"{lora}.safetensors"
    if lora == "peft_config":
        config = {"unet.r": 8, "unet.lora_alpha": 4, "unet.use_rslora": True, "text_encoder.r": 8,
                  "text_encoder.lora_alpha": 16, "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                  "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}
        path = write_random_lora(tmp_path / "peft_config.safetensors", fmt="peft", rank=8, seed=9,
                                 metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    ours = load_model(checkpoint, compute_hash=False)
    activate(ours.loras, [LoraRef(lora, unet, te)], lambda name: path, LoraFileCache())
    pipe = reference_pipeline(checkpoint)
    plain = {**{"unet." + k: v.clone() for k, v in pipe.unet.state_dict().items()},
             **{"text_encoder." + k.removeprefix("text_model."): v.clone()
                for k, v in pipe.text_encoder.state_dict().items()}}
    merge_lora_reference(pipe, path, unet, te)
    expected = {**{"unet." + k: v for k, v in pipe.unet.state_dict().items()},
                **{"text_encoder." + k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}}
    got = _diffusers_named(ours)
    changed = [k for k in expected if not torch.equal(expected[k], plain[k])]
    assert len(changed) == ours.loras.merged_weights
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), key


def test_batch_with_kohya_and_peft_loras_matches_diffusers(models, checkpoint, tmp_path):
    """``darkroom --batch`` with a kohya LoRA (prompt tag) and a PEFT one (``loras`` field) against diffusers'
    pipeline from the same checkpoint with the same LoRA files merged at the same scales (4 Euler steps: the
    parity holds per step, and four diffusers runs of a 10-step job cost a minute on a loaded 2-core box)."""
    kohya = request(steps=4, width=64, height=96, prompt="a lighthouse at dusk <lora:kohya:0.8>")
    peft = request(steps=4, width=64, height=96, seed=7, loras=[{"name": "peft", "weight": 0.6}])
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r.to_dict()) for r in (kohya, peft)))
    code, paths, err = _batch(models, jobs, tmp_path)
    assert code == 0 and len(paths) == 2, err

    results = []
    for req, lora, scale in ((kohya, "kohya.safetensors", 0.8), (peft, "styles/peft.safetensors", 0.6)):
        pipe = reference_pipeline(checkpoint)
        plain = pipe(prompt=strip_tags(req.prompt), negative_prompt=req.negative_prompt, num_inference_steps=4,
                     guidance_scale=req.cfg, generator=torch.Generator().manual_seed(req.seed), width=64,
                     height=96).images[0]
        merge_lora_reference(pipe, models / "loras" / lora, scale)
        expected = pipe(prompt=strip_tags(req.prompt), negative_prompt=req.negative_prompt, num_inference_steps=4,
                        guidance_scale=req.cfg, generator=torch.Generator().manual_seed(req.seed), width=64,
                        height=96).images[0]
        ours = Image.open(paths[len(results)]).convert("RGB")
        results.append((psnr(ours, expected), psnr(ours, plain)))
    print("PSNR with LoRA vs diffusers, vs diffusers without:", results)
    for with_lora, without in results:
        assert with_lora >= 40
        assert without < with_lora - 5  # the LoRA visibly changed the image


def test_a_switch_reaches_the_parameters_the_placement_put_in(model, models, checkpoint):
    """On a GPU the memory plan's Placement puts a device copy, another Parameter object, in each slot of a
    network it moves in (and the CPU one back when it moves it out): a LoRA switch while the network is there
    must merge into the copy it runs with, not into the object it replaced (simulated on the CPU by putting
    clones in the slots, as Placement._move_in does)."""
    find, cache = _find(models), LoraFileCache()
    activate(model.loras, [LoraRef("unet_only", 0.9)], find, cache)
    for module in model.checkpoint.components.values():
        for owner in module.modules():
            for name, param in owner._parameters.items():
                if param is not None:
                    owner._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
    activate(model.loras, [LoraRef("peft", 0.5)], find, cache)
    expected = load_model(checkpoint, compute_hash=False)
    activate(expected.loras, [LoraRef("peft", 0.5)], find, cache)
    want, got = _weights(expected), _weights(model)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---- LoRA merges under the memory plans (meta = GPU) and the weights' memory format ------------------------


class _MetaReadsAsZeros(TorchFunctionMode):
    """The ``meta`` device as a GPU whose bytes cannot be read back: a copy of a meta tensor to the CPU (moving a
    network home after a merge on the "GPU", keeping the original of a weight merged there) gives zeros of its
    shape and strides. Where memory lives is real; the values copied home are not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as exc:
            if "meta" not in str(exc):
                raise

            def readable(a):
                return torch.zeros_like(a, device="cpu") if isinstance(a, torch.Tensor) and a.is_meta else a

            return func(*[readable(a) for a in args], **{k: readable(v) for k, v in kwargs.items()})


def _meta_bytes() -> int:
    """Bytes of every live tensor on the meta device (views counted once, with their base)."""
    import gc

    gc.collect()
    live = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_meta:
            base = obj._base if obj._base is not None else obj
            live[id(base)] = base.nbytes
    return sum(live.values())


class Ctx:
    def set_activity(self, text: str) -> None:
        pass


def _job(runner: PipelineRunner, model, tags: str, mode: str) -> None:
    """What ``PipelineRunner.run`` does around a job's sampling: merge its LoRAs, plan and place (nothing runs)."""
    job_request = request(prompt=f"a lighthouse {tags}")
    runner.memory_mode = mode
    runner.apply_loras(model, job_request)
    runner.run_with_memory_plan(model, job_request, None, Ctx(), lambda: [])


def test_lora_merges_follow_the_memory_plan_off_the_gpu(models):
    """A switch merged on the GPU (everything resident) keeps the previous set's buffers there and caches the
    LoRA factors there; once the next job's plan offloads the UNet (model offload, then sequential), none of it
    may stay on the GPU: the merged weights go home with the network, the kept buffers and factors are let go,
    and a switch or a removal under offload merges on the CPU, where the plan keeps the weights."""
    from core.accel.memory import Placement

    runner = PipelineRunner([models], previews=False)
    runner.placement = Placement(torch.device("meta"))
    with _MetaReadsAsZeros():
        model = runner.ensure_model(request())
        unet = model.checkpoint.components["unet"]
        baseline = _meta_bytes()  # what other tests left on meta

        def job(tags: str, mode: str) -> None:
            _job(runner, model, tags, mode)

        job("<lora:kohya:1>", "gpu")
        job("<lora:peft:0.5>", "gpu")  # switched on the "GPU": kohya's buffers kept there
        assert runner.memory_plan.offload == "none" and next(unet.parameters()).is_meta
        assert any(t.is_meta for group in model.loras._spares.values() for t in group.values())
        job("<lora:peft:0.5>", "lowvram")  # the same set, now under model offload
        assert runner.memory_plan.offload == "model"
        assert model.loras.merged_weights and not next(unet.parameters()).is_meta
        assert _meta_bytes() == baseline  # nothing of the UNet or its LoRAs is left on the GPU
        job("<lora:kohya:0.7>", "lowvram")  # a switch under offload merges on the CPU
        assert _meta_bytes() == baseline
        with runner.placement.use(placement_key(model), ("unet",)):  # the merged weights go in with the UNet
            assert all(p.is_meta for p in unet.parameters())
        runner.placement.release(placement_key(model), ("unet",))  # the next stage's move: all of it goes home
        assert _meta_bytes() == baseline
        job("<lora:kohya:1>", "sequential")
        job("", "sequential")  # removed under sequential offload: only the resident modules are on the GPU
        resident = sum(p.nbytes for p in unet.parameters() if p.is_meta)
        assert model.loras.merged_weights == 0 and _meta_bytes() == baseline + resident
        runner.placement.release_all()
        assert _meta_bytes() == baseline


def test_lora_buffers_kept_on_the_gpu_give_way_to_a_resident_plan(models, monkeypatch):
    """Merge buffers a switch kept on the GPU (for a switch back) are room the plan can have: a job that fits
    resident only without them lets them go and runs resident instead of offloading the UNet."""
    from core.accel import memory
    from core.accel.memory import Placement

    meta = torch.device("meta")
    runner = PipelineRunner([models], previews=False)
    runner.placement = Placement(meta)
    with _MetaReadsAsZeros():
        model = runner.ensure_model(request())
        _job(runner, model, "<lora:kohya:1>", "gpu")
        _job(runner, model, "<lora:peft:0.5>", "gpu")
        kept = model.loras.spare_bytes(meta)
        assert kept
        need = memory.estimate_job(model, request()).need("none")
        fitting = int(need * memory.SAFETY_FACTOR) + memory.SAFETY_BYTES + 1  # the least free memory that fits
        resident = runner.placement.resident_bytes()
        monkeypatch.setattr(memory, "free_memory", lambda device: fitting - resident - kept // 2)
        _job(runner, model, "<lora:peft:0.5>", "auto")
        assert runner.memory_plan.offload == "none" and model.loras.spare_bytes(meta) == 0
        assert model.loras.merged_weights and next(model.checkpoint.components["unet"].parameters()).is_meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_merged_channels_last_conv_weight_stays_channels_last(checkpoint, models, dtype):
    """On CUDA the UNet's weights are channels_last (``use_channels_last``): a merge must keep each weight's
    memory format (a contiguous merge costs every forward a layout conversion), with the bits of a merge into
    the contiguous model, also for two LoRA kinds on one conv (that path works on a float32 copy)."""
    find, cache = _find(models), LoraFileCache()
    refs = [LoraRef("locon", 0.8), LoraRef("loha", 0.6)]
    plain = load_model(checkpoint, compute_hash=False, dtype=dtype)
    activate(plain.loras, refs, find, cache)
    nhwc = load_model(checkpoint, compute_hash=False, dtype=dtype)
    unet = nhwc.checkpoint.components["unet"]
    unet.to(memory_format=torch.channels_last)
    convs = {n for n, p in unet.named_parameters() if p.ndim == 4 and p.shape[-1] > 1}
    before = {n: unet.get_parameter(n).data_ptr() for n in convs}
    activate(nhwc.loras, refs, find, cache)
    merged = {n for n in convs if unet.get_parameter(n).data_ptr() != before[n]}
    assert merged  # the LoCon and LoHa reach the 3x3 convs
    want = _weights(plain)
    for name in merged:
        weight = unet.get_parameter(name)
        assert weight.is_contiguous(memory_format=torch.channels_last), name
        assert torch.equal(weight, want[f"unet.{name}"]), name
    activate(nhwc.loras, [LoraRef("locon", 0.5)], find, cache)  # a switch writes into kept buffers: still NHWC
    assert all(unet.get_parameter(n).is_contiguous(memory_format=torch.channels_last) for n in convs)
    activate(nhwc.loras, [], find, cache)
    assert all(unet.get_parameter(n).data_ptr() == before[n] for n in convs)
