"""OpenCLIPTextModel against transformers' CLIP text models loaded the way diffusers loads a single file
(``convert_open_clip_checkpoint``) with the same random weights: SDXL's bigG (penultimate raw hidden states and
the projected pooled vector) and SD2.x's ViT-H (penultimate layer after the final norm)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.models.open_clip import OpenCLIPTextConfig, OpenCLIPTextModel
from core.models.testing import random_state_dict

transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")


def _hf_config(cfg: OpenCLIPTextConfig, layers: int | None = None):
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        num_hidden_layers=layers or cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions,
        hidden_act="gelu",
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.projection_dim,
        eos_token_id=2,  # as the real SD2.x/SDXL configs: pooled output at argmax(ids)
    )


def _ours(cfg: OpenCLIPTextConfig, seed: int = 0):
    with torch.device("meta"):
        meta = OpenCLIPTextModel(cfg)
    weights = random_state_dict(meta, seed=seed)
    ours = OpenCLIPTextModel(cfg)
    ours.load_state_dict(weights, strict=True)
    return ours.eval(), weights


def _ids(batch: int = 3, n: int = 77, seed: int = 0, pad: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49406, (batch, n), generator=g)
    ids[:, 0] = 49406
    for row in range(batch):  # EOS at a different place in each row, then SDXL tokenizer_2's "!" padding
        ids[row, 4 + 13 * row] = 49407
        ids[row, 5 + 13 * row :] = pad
    return ids


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_sdxl_bigG_matches_reference_hidden_and_pooled():
    cfg = OpenCLIPTextConfig.preset("sdxl", "tiny")
    ours, weights = _ours(cfg)
    prefix = "conditioner.embedders.1.model."
    checkpoint = {prefix + k: v for k, v in weights.items()}
    checkpoint[prefix + "logit_scale"] = torch.tensor(4.6)  # real files carry it; not part of the encoder
    ref = transformers.CLIPTextModelWithProjection(_hf_config(cfg)).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(ref, checkpoint, prefix=prefix)
    ref.load_state_dict(converted, strict=True)

    ids = _ids()
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        mine = ours.encode(ids, layer_from_end=2, final_norm=False)
    assert _rel(mine.hidden, out.hidden_states[-2]) < 1e-5
    assert _rel(mine.pooled, out.text_embeds) < 1e-5
    # the last layer after the final norm, as a check that layer counting is right
    last = ours.encode(ids, layer_from_end=1).hidden
    assert _rel(last, out.last_hidden_state) < 1e-5


def test_sd2_vit_h_penultimate_matches_reference_without_its_last_block():
    cfg = OpenCLIPTextConfig.preset("sd2", "tiny")
    ours, weights = _ours(cfg, seed=3)
    prefix = "cond_stage_model.model."
    last = f"transformer.resblocks.{cfg.layers - 1}."
    # diffusers builds SD2.x's encoder one block short (the penultimate layer is the conditioning) and
    # ignores the last block's keys; the real converter lists block 23 of the 24-block ViT-H.
    checkpoint = {prefix + k: v for k, v in weights.items() if not k.startswith(last)}
    ref = transformers.CLIPTextModel(_hf_config(cfg, layers=cfg.layers - 1)).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(ref, checkpoint, prefix=prefix)
    converted.pop("text_projection.weight", None)  # SD2.x uses no projection (diffusers ignores the key)
    if not any(k.startswith("text_model.") for k in ref.state_dict()):  # transformers >= 5.6 flattened it
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    ref.load_state_dict(converted, strict=True)

    ids = _ids(seed=1, pad=49407)
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        got = ours(ids, layer_from_end=2, final_norm=True)
        both = ours.encode(ids, layer_from_end=2)
    assert _rel(got, expected) < 1e-5
    assert torch.equal(both.hidden, got)  # computing the pooled vector too does not change the hidden states


def test_config_read_off_shapes_round_trips_and_rejects_gaps():
    for family in ("sd2", "sdxl"):
        for size in ("tiny", "full"):
            cfg = OpenCLIPTextConfig.preset(family, size)
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in OpenCLIPTextModel(cfg).state_dict().items()}
            assert OpenCLIPTextConfig.from_state_dict(shapes) == cfg
    full = OpenCLIPTextConfig.preset("sdxl")
    assert (full.heads, full.width, full.layers) == (20, 1280, 32)
    assert OpenCLIPTextConfig.preset("sd2").heads == 16
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in OpenCLIPTextModel(OpenCLIPTextConfig.preset("sdxl", "tiny"))
                  .state_dict().items() if not k.startswith("transformer.resblocks.1.")}
    with pytest.raises(ValueError, match="not numbered"):
        OpenCLIPTextConfig.from_state_dict(shapes)
    with pytest.raises(ValueError, match="lack 'token_embedding.weight'"):
        OpenCLIPTextConfig.from_state_dict({})
    with pytest.raises(ValueError, match="multiple of the 64-wide heads"):
        dataclasses.replace(full, width=100)


def test_state_dict_keys_are_the_checkpoint_names():
    with torch.device("meta"):
        keys = set(OpenCLIPTextModel(OpenCLIPTextConfig.preset("sdxl", "tiny")).state_dict())
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
            "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.bias",
            "transformer.resblocks.2.mlp.c_proj.weight"} <= keys
    assert not any("logit_scale" in k for k in keys)
