"""Textual-inversion embeddings: A1111 ``.pt`` (multi-vector ``string_to_param``), ``emb_params``
``.safetensors`` (one vector) and SDXL ``clip_l``/``clip_g`` files in ``models/embeddings``, used by name in
the prompt, against the same prompt encoded with those token embeddings replaced by hand; the prompt cache
keys on the files used; a pickle with code in it is refused."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from core.errors import CheckpointError
from core.models.conditioning import EncoderSettings
from core.models.embeddings import EmbeddingLibrary, read_embedding
from core.models.registry import ModelRegistry
from core.models.safetensors_writer import save_tensors
from core.models.testing import write_random_checkpoint
from core.models.tokenizer import get_tokenizer
from core.pipeline import PromptCache, load_model

SPARE = 1000  # token ids whose embedding rows the hand-made reference overwrites with the vectors


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "sd.safetensors", "sd15", "tiny", seed=0, dtype=torch.float32)
    write_random_checkpoint(root / "checkpoints" / "xl.safetensors", "sdxl", "tiny", seed=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    folder = root / "embeddings"
    (folder / "neg").mkdir(parents=True)
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.randn(3, 32, generator=g)},
                "name": "badhands", "step": 1500, "sd_checkpoint_name": "v1-5"}, folder / "neg" / "badhands.pt")
    save_tensors({"emb_params": torch.randn(1, 32, generator=g)}, folder / "shiny.safetensors")
    save_tensors({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 128, generator=g)},
                 folder / "xlstyle.safetensors")
    return root


def _library(models: Path) -> EmbeddingLibrary:
    registry = ModelRegistry([models])
    return EmbeddingLibrary(lambda: [(m.name, m.path) for m in registry.embeddings()])


def _by_hand(tokenizer, text: str, replacements: dict[str, torch.Tensor], lookup: torch.nn.Embedding):
    """The ids of ``text`` with each named word's tokens replaced by spare ids whose rows of (a copy of)
    ``lookup`` hold the vectors; returns the ids window and the patched weight."""
    ids = tokenizer.encode(text)
    weight = lookup.weight.detach().clone()
    spare = SPARE
    for name, vectors in replacements.items():
        name_ids = tokenizer.encode(name)
        at = next(i for i in range(len(ids)) if ids[i : i + len(name_ids)] == name_ids)
        new = list(range(spare, spare + vectors.shape[0]))
        weight[spare : spare + vectors.shape[0]] = vectors
        spare += vectors.shape[0]
        ids = ids[:at] + new + ids[at + len(name_ids) :]
    return torch.tensor([tokenizer.window(ids)]), weight


def test_files_of_each_layout_read_and_pickled_code_is_refused(models, tmp_path):
    assert read_embedding(models / "embeddings" / "neg" / "badhands.pt").vectors[""].shape == (3, 32)
    assert read_embedding(models / "embeddings" / "shiny.safetensors").vectors[""].shape == (1, 32)
    assert set(read_embedding(models / "embeddings" / "xlstyle.safetensors").vectors) == {"clip_l", "clip_g"}

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "x": Payload()}, bad)
    with pytest.raises(CheckpointError, match="pickled Python code"):
        read_embedding(bad)


def test_sd15_names_in_the_prompt_become_their_vectors(models):
    model = load_model(models / "checkpoints" / "sd.safetensors", compute_hash=False)
    model.conditioner.embeddings = _library(models)
    text = "a portrait, badhands, Shiny armor"
    ours = model.conditioner.encode(text, EncoderSettings(clip_skip=1)).context
    clip = copy.deepcopy(model.checkpoint.components["text_encoder"])
    lookup = clip.text_model.embeddings.token_embedding
    vectors = {"badhands": read_embedding(models / "embeddings" / "neg" / "badhands.pt").vectors[""],
               "shiny": read_embedding(models / "embeddings" / "shiny.safetensors").vectors[""]}
    ids, weight = _by_hand(get_tokenizer(), text, vectors, lookup)
    with torch.no_grad():
        lookup.weight.copy_(weight)
        expected = clip(ids)
    assert ours.shape == expected.shape and torch.allclose(ours, expected, atol=1e-5)
    plain = load_model(models / "checkpoints" / "sd.safetensors", compute_hash=False)
    assert not torch.allclose(plain.conditioner.encode(text, EncoderSettings()).context, ours, atol=1e-3)
    # a name that is only part of a word is no embedding (A1111 matches whole tokens)
    assert torch.equal(model.conditioner.encode("shinyarmor", EncoderSettings()).context,
                       plain.conditioner.encode("shinyarmor", EncoderSettings()).context)


def test_sdxl_files_give_each_encoder_its_part(models):
    model = load_model(models / "checkpoints" / "xl.safetensors", compute_hash=False)
    model.conditioner.embeddings = _library(models)
    text = "xlstyle, a castle"
    ours = model.conditioner.encode(text, EncoderSettings())
    parts = read_embedding(models / "embeddings" / "xlstyle.safetensors").vectors
    clip_l = copy.deepcopy(model.checkpoint.components["text_encoder"])
    big_g = copy.deepcopy(model.checkpoint.components["text_encoder_2"])
    ids_l, w_l = _by_hand(get_tokenizer(), text, {"xlstyle": parts["clip_l"]}, clip_l.text_model.embeddings.token_embedding)
    ids_g, w_g = _by_hand(get_tokenizer(pad_id=0), text, {"xlstyle": parts["clip_g"]}, big_g.token_embedding)
    with torch.no_grad():
        clip_l.text_model.embeddings.token_embedding.weight.copy_(w_l)
        big_g.token_embedding.weight.copy_(w_g)
        z_l = clip_l(ids_l, clip_skip=2, final_norm=False)
        out = big_g.encode(ids_g, layer_from_end=2, final_norm=False)
    assert torch.allclose(ours.context, torch.cat([z_l, out.hidden], dim=-1), atol=1e-5)
    assert torch.allclose(ours.pooled, out.pooled, atol=1e-5)
    # an SD1.5 embedding (one 32-wide set) fits CLIP-L only; bigG keeps the plain word
    mixed = model.conditioner.encode("shiny", EncoderSettings()).context
    plain = load_model(models / "checkpoints" / "xl.safetensors", compute_hash=False)
    reference = plain.conditioner.encode("shiny", EncoderSettings()).context
    assert not torch.allclose(mixed[..., :32], reference[..., :32]) and torch.equal(mixed[..., 32:], reference[..., 32:])


def test_the_prompt_cache_keys_on_the_embedding_files_used(models, tmp_path):
    root = tmp_path / "models"
    (root / "embeddings").mkdir(parents=True)
    os.symlink(models / "checkpoints", root / "checkpoints")
    path = save_tensors({"emb_params": torch.randn(1, 32)}, root / "embeddings" / "glow.safetensors")
    model = load_model(root / "checkpoints" / "sd.safetensors", compute_hash=False)
    model.conditioner.embeddings = _library(root)
    cache = PromptCache()
    first = cache.encode(model, "glow lamp")
    cache.encode(model, "glow lamp")
    cache.encode(model, "a lamp")
    assert (cache.hits, cache.misses) == (1, 2)
    save_tensors({"emb_params": torch.randn(1, 32) * 3}, path)  # retrained: same name, new vectors
    os.utime(path, ns=(1, 1))
    second = cache.encode(model, "glow lamp")
    cache.encode(model, "a lamp")
    assert (cache.hits, cache.misses) == (2, 3) and not torch.allclose(first.context, second.context)
