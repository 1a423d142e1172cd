"""CLIPTextModel against transformers' CLIP text model loaded with the same random weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from core.errors import DarkroomError, RequestError
from core.models.clip import CLIPTextConfig, CLIPTextModel
from core.models.testing import random_state_dict
from tests.reference import transformers_clip_config

transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

SD15_CONFIG = Path("/work/shared/data/model-configs/runwayml/stable-diffusion-v1-5/text_encoder/config.json")
PREFIX = "cond_stage_model.transformer."


def _ours_and_reference(cfg: CLIPTextConfig, seed: int = 0):
    with torch.device("meta"):
        meta = CLIPTextModel(cfg)
    weights = random_state_dict(meta, seed=seed)
    ours = CLIPTextModel(cfg)
    ours.load_state_dict(weights, strict=True)
    # Reference built the way diffusers loads a single file: checkpoint keys -> convert -> strip text_model.
    checkpoint = {PREFIX + k: v for k, v in weights.items()}
    checkpoint[PREFIX + "text_model.embeddings.position_ids"] = torch.arange(cfg.max_positions)[None]
    converted = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    converted.pop("text_model.embeddings.position_ids")
    if cfg.projection_dim is None:
        ref = transformers.CLIPTextModel(transformers_clip_config(cfg))
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    else:
        ref = transformers.CLIPTextModelWithProjection(transformers_clip_config(cfg))  # still nests under text_model.
    ref.load_state_dict(converted, strict=True)
    return ours.eval(), ref.eval()


def _ids(batch: int = 3, n: int = 77, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (batch, n), generator=g)
    ids[:, 0] = 49406
    for row in range(batch):  # EOS at a different place in each row, padded with EOS after it
        ids[row, 3 + 11 * row :] = 49407
    return ids


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_hidden_states_match_reference_for_every_clip_skip(activation):
    cfg = dataclasses.replace(CLIPTextConfig.preset("sd15", "tiny"), layers=4, activation=activation)
    ours, ref = _ours_and_reference(cfg)
    ids = _ids()
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        assert len(out.hidden_states) == cfg.layers + 1  # embeddings, then each layer
        for clip_skip in range(1, cfg.layers + 1):
            # A1111: the output clip_skip layers from the end, then the final norm.
            want = ref.final_layer_norm(out.hidden_states[-clip_skip])
            got = ours(ids, clip_skip=clip_skip)
            assert got.shape == (3, 77, cfg.width)
            assert _rel(got, want) <= 1e-5, clip_skip
            raw = ours(ids, clip_skip=clip_skip, final_norm=False)
            assert _rel(raw, out.hidden_states[-clip_skip]) <= 1e-5
            enc = ours.encode(ids, clip_skip=clip_skip)
            assert _rel(enc.hidden, want) <= 1e-5
            # Pooled always comes from the last layer at the EOS token.
            assert _rel(enc.pooled, out.pooler_output) <= 1e-5
        assert _rel(ours(ids), out.last_hidden_state) <= 1e-5
        # Different clip skips really give different conditioning.
        assert _rel(ours(ids, clip_skip=2), out.last_hidden_state) > 1e-2


def test_tiny_preset_and_projection_match_reference():
    cfg = dataclasses.replace(CLIPTextConfig.preset("sd15", "tiny"), projection_dim=24)
    ours, ref = _ours_and_reference(cfg, seed=3)
    ids = _ids(batch=2, seed=5)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        enc = ours.encode(ids, clip_skip=2)
        assert _rel(enc.pooled, out.text_embeds) <= 1e-5
        assert enc.pooled.shape == (2, 24)
        assert _rel(enc.hidden, ref.text_model.final_layer_norm(out.hidden_states[-2])) <= 1e-5


def test_diffusers_clip_skip_mapping():
    """diffusers' clip_skip=k takes hidden_states[-(k + 1)]: the same tensor as A1111 clip_skip=k + 1."""
    cfg = dataclasses.replace(CLIPTextConfig.preset("sd15", "tiny"), layers=3)
    ours, ref = _ours_and_reference(cfg, seed=7)
    ids = _ids(batch=2)
    with torch.no_grad():
        states = ref(ids, output_hidden_states=True).hidden_states
        for k in (1, 2):
            assert _rel(ours(ids, clip_skip=k + 1), ref.final_layer_norm(states[-(k + 1)])) <= 1e-5


def test_full_preset_is_sd15_config_and_keys_match_transformers():
    real = json.loads(SD15_CONFIG.read_text())
    cfg = CLIPTextConfig.preset("sd15", "full")
    assert (cfg.vocab_size, cfg.width, cfg.layers, cfg.heads, cfg.intermediate, cfg.max_positions) == (
        real["vocab_size"],
        real["hidden_size"],
        real["num_hidden_layers"],
        real["num_attention_heads"],
        real["intermediate_size"],
        real["max_position_embeddings"],
    )
    assert (cfg.activation, cfg.layer_norm_eps) == (real["hidden_act"], real["layer_norm_eps"])
    with torch.device("meta"):
        ours = CLIPTextModel(cfg)
        ref = transformers.CLIPTextModel(transformers_clip_config(cfg))
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ours_sd) == {"text_model." + k for k in ref_sd}
    for key, value in ref_sd.items():
        assert ours_sd["text_model." + key].shape == value.shape
    assert "text_model.embeddings.position_ids" not in ours_sd  # non-persistent
    assert "text_model.embeddings.position_ids" in dict(ours.named_buffers())


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_from_state_dict_round_trip(size):
    cfg = CLIPTextConfig.preset("sd15", size)
    for variant in (cfg, dataclasses.replace(cfg, projection_dim=16, layers=3)):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in CLIPTextModel(variant).state_dict().items()}
        shapes["text_model.embeddings.position_ids"] = (1, 77)  # as real files carry it
        assert CLIPTextConfig.from_state_dict(shapes) == variant


def test_from_state_dict_reports_missing_key():
    with pytest.raises(ValueError, match="token_embedding"):
        CLIPTextConfig.from_state_dict({"text_model.final_layer_norm.weight": (768,)})


def test_loads_random_checkpoint_on_meta_with_assign():
    """The loader's path: model on meta, checkpoint keys minus prefix, position_ids dropped, assign=True."""
    with torch.device("meta"):
        meta = CLIPTextModel(CLIPTextConfig.preset("sd15", "tiny"))
    # A file's text-encoder section: the weights plus the position_ids buffer real SD1.x files carry.
    weights = random_state_dict(meta, seed=11, dtype=torch.float16)
    weights["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    weights.pop("text_model.embeddings.position_ids")
    cfg = CLIPTextConfig.from_state_dict({k: tuple(v.shape) for k, v in weights.items()})
    assert cfg == CLIPTextConfig.preset("sd15", "tiny")
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    assert model.text_model.embeddings.token_embedding.weight.dtype == torch.float16  # no fp32 copy
    with torch.no_grad():
        out = model.float()(_ids(batch=2))
    assert out.shape == (2, 77, 32) and torch.isfinite(out).all()


def test_bad_clip_skip_is_a_user_error():
    model = CLIPTextModel(CLIPTextConfig.preset("sd15", "tiny"))
    for bad in (0, 3, 1.5, True):
        with pytest.raises(RequestError, match="clip_skip") as info:
            model(_ids(batch=1), clip_skip=bad)
        assert isinstance(info.value, DarkroomError)
