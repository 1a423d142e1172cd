"""Flux.1 LoRAs: every trainer's naming (kohya, BFL/ComfyUI, diffusers/ai-toolkit, XLabs) merged into our
transformer equals diffusers' reading of the same file (``FluxLoraLoaderMixin.lora_state_dict``, i.e.
``lora_conversion_utils``) merged into diffusers' layers, compared through diffusers' own BFL->diffusers
checkpoint converter; split q/k/v land on row blocks of our fused layers."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import pytest
import torch

from core.lora.check import check_lora
from core.lora.files import LoraFileCache, read_lora
from core.lora.patch import LoraPatcher, activate
from core.lora.tags import LoraRef
from core.models.families import FAMILIES
from core.models.flux import Flux, FluxConfig
from core.models.safetensors_writer import save_tensors
from core.models.testing import (
    random_flux_lora_state_dict,
    random_flux_transformer_state_dict,
    write_random_flux_transformer,
)

pytest.importorskip("diffusers")
from tests.test_flux import bfl_to_diffusers  # noqa: E402

CFG = FluxConfig.preset("flux", "tiny", "dev")
D = CFG.hidden_size


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return random_flux_transformer_state_dict("dev", "tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def diffusers_base(base) -> dict[str, torch.Tensor]:
    return bfl_to_diffusers(base, CFG)


def _merged(base, tensors, tmp_path, weight: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    module = Flux(CFG)
    module.load_state_dict(base)
    path = save_tensors(tensors, tmp_path / "flux_lora.safetensors")
    patcher = LoraPatcher({"unet": module}, FAMILIES["flux"])
    warnings = activate(patcher, [LoraRef("flux_lora", weight)], lambda name: path, LoraFileCache())
    return {k: v.clone() for k, v in module.state_dict().items()}, warnings


@contextmanager
def _tiny_kohya_split():
    """diffusers' kohya converter hard-codes FLUX.1's widths where it splits a single block's linear1
    (``dims=[3072, 3072, 3072, 12288]``); for the tiny model its own source runs with the tiny widths."""
    from diffusers.loaders import lora_conversion_utils, lora_pipeline

    fn = lora_conversion_utils._convert_kohya_flux_lora_to_diffusers
    source = inspect.getsource(fn)
    old = "dims=[3072, 3072, 3072, 12288]"
    assert source.count(old) == 1, "diffusers' kohya Flux converter changed"
    source = source.replace(old, f"dims=[{D}, {D}, {D}, {CFG.mlp_hidden_dim}]")
    namespace = dict(vars(lora_conversion_utils))
    exec(compile(source, lora_conversion_utils.__file__, "exec"), namespace)
    original = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = namespace[fn.__name__]
    try:
        yield
    finally:
        lora_pipeline._convert_kohya_flux_lora_to_diffusers = original


def _diffusers_merge(diffusers_base, tensors, weight: float) -> dict[str, torch.Tensor]:
    """diffusers' conversion of the file, then PEFT's merge ``W += weight * alpha / r * B @ A`` per layer."""
    from diffusers.loaders import lora_pipeline

    with _tiny_kohya_split():
        state_dict, alphas = lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(dict(tensors), return_alphas=True)
    out = {k: v.clone() for k, v in diffusers_base.items()}
    for key in [k for k in state_dict if k.endswith(".lora_A.weight")]:
        name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        a, b = state_dict[key].double(), state_dict[key.replace("lora_A", "lora_B")].double()
        alpha = (alphas or {}).get(key.replace(".lora_A.weight", ".alpha"))
        scale = float(alpha) / a.shape[0] if alpha is not None else 1.0
        out[name + ".weight"] = (out[name + ".weight"].double() + weight * scale * (b @ a)).float()
    return out


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "xlabs"])
def test_each_naming_merges_as_diffusers_reads_it(base, diffusers_base, tmp_path, fmt):
    linear = {k.removesuffix(".weight"): tuple(v.shape) for k, v in diffusers_base.items()
              if k.endswith(".weight") and v.ndim == 2}
    tensors = random_flux_lora_state_dict(fmt, seed=1, diffusers_names=linear)
    ours, warnings = _merged(base, tensors, tmp_path, 0.8)
    assert warnings == []  # every key found a layer
    expected = _diffusers_merge(diffusers_base, tensors, 0.8)
    got = bfl_to_diffusers(ours, CFG)
    changed = {k for k in expected if not torch.equal(expected[k], diffusers_base[k])}
    assert changed and changed == {k for k in got if not torch.allclose(got[k], diffusers_base[k], atol=0, rtol=0)}
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), key
    if fmt == "diffusers":  # every Linear layer of diffusers' model, split ones included
        assert len(changed) == len(linear)


def test_bfl_comfyui_naming_equals_kohya(base, tmp_path):
    kohya, _ = _merged(base, random_flux_lora_state_dict("kohya", seed=2, alpha=None), tmp_path, 1.0)
    bfl, warnings = _merged(base, random_flux_lora_state_dict("bfl", seed=2), tmp_path, 1.0)
    assert warnings == [] and all(torch.equal(kohya[k], bfl[k]) for k in kohya)
    assert not torch.equal(kohya["double_blocks.0.img_attn.qkv.weight"], base["double_blocks.0.img_attn.qkv.weight"])


def test_split_layers_land_on_row_blocks_of_the_fused_weights(base, diffusers_base, tmp_path):
    """Hand-computed: to_k on rows [D, 2D) of qkv, proj_mlp after q/k/v in linear1, norm_out's [scale, shift]
    on BFL's [shift, scale]."""
    linear = {k.removesuffix(".weight"): tuple(v.shape) for k, v in diffusers_base.items()
              if k.endswith(".weight") and v.ndim == 2}
    wanted = ("transformer_blocks.1.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp", "norm_out.linear")
    tensors = random_flux_lora_state_dict("diffusers", seed=3, diffusers_names={k: linear[k] for k in wanted})
    ours, _ = _merged(base, tensors, tmp_path, 1.0)

    def delta(name):
        return tensors[f"transformer.{name}.lora_B.weight"] @ tensors[f"transformer.{name}.lora_A.weight"]

    qkv = ours["double_blocks.1.txt_attn.qkv.weight"] - base["double_blocks.1.txt_attn.qkv.weight"]
    assert torch.allclose(qkv[D : 2 * D], delta(wanted[0]), atol=1e-6) and not qkv[:D].any() and not qkv[2 * D :].any()
    linear1 = ours["single_blocks.0.linear1.weight"] - base["single_blocks.0.linear1.weight"]
    assert torch.allclose(linear1[3 * D :], delta(wanted[1]), atol=1e-6) and not linear1[: 3 * D].any()
    ada = ours["final_layer.adaLN_modulation.1.weight"] - base["final_layer.adaLN_modulation.1.weight"]
    assert torch.allclose(torch.cat([ada[D:], ada[:D]]), delta(wanted[2]), atol=1e-6)


def test_a_flux_lora_is_checked_against_a_flux_checkpoint_from_the_headers(tmp_path):
    checkpoint = write_random_flux_transformer(tmp_path / "flux1-dev.safetensors")
    path = save_tensors(random_flux_lora_state_dict("kohya", seed=4), tmp_path / "k.safetensors")
    assert read_lora(path).family == "flux"
    assert check_lora(path, checkpoint, "k", "flux1-dev") == []


# ---- the proof: darkroom --batch with Flux LoRAs against FluxPipeline ----------------------------------------


def _merge_into_flux_pipeline(pipe, path, unet: float, te: float) -> None:
    """What ``FluxPipeline.load_lora_weights(path)`` then ``fuse_lora`` at ``unet`` (transformer) and ``te``
    (CLIP-L) does, peft's step written out (peft is not installed here; as ``merge_lora_reference``): diffusers'
    ``lora_state_dict`` converts the file (kohya: alpha / r baked into the factors), the text encoder's keys go
    through ``convert_state_dict_to_peft``, and each layer gets ``W += scale * B @ A``."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    with _tiny_kohya_split():
        state_dict, alphas = pipe.lora_state_dict(str(path), return_alphas=True)
    assert not alphas  # both formats here: no alphas left to apply (baked by the kohya converter, none in PEFT)
    transformer = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
    text = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
        {k.removeprefix("text_encoder."): v for k, v in state_dict.items() if k.startswith("text_encoder.")}))
    assert transformer and text and len(transformer) + len(text) == len(state_dict)
    flat_text = not any(k.startswith("text_model.") for k in pipe.text_encoder.state_dict())  # transformers >= 5.6
    with torch.no_grad():
        for model, sd, scale in ((pipe.transformer, transformer, unet), (pipe.text_encoder, text, te)):
            for key in [k for k in sd if k.endswith(".lora_A.weight")]:
                name = key.removesuffix(".lora_A.weight")
                if flat_text and model is pipe.text_encoder:
                    name = name.removeprefix("text_model.")
                weight = model.get_submodule(name).weight
                weight += scale * (sd[key.replace("lora_A", "lora_B")].float() @ sd[key].float())


def test_batch_with_kohya_and_diffusers_flux_loras_matches_flux_pipeline(tmp_path, monkeypatch):
    """``darkroom --batch``: a kohya Flux LoRA (``lora_unet_*`` + CLIP-L ``lora_te1_*``, prompt tag) and a
    diffusers/PEFT one (``transformer.*`` + ``text_encoder.*``, ``loras`` field with its own text-encoder
    weight) against diffusers' ``FluxPipeline`` with the same files merged at the same scales, PSNR >= 40 dB."""

    from PIL import Image

    from core.lora.tags import strip_tags
    from core.metadata import read_request
    from core.models.testing import write_random_flux_checkpoint
    from tests.batch_harness import run_jobs
    from tests.reference import psnr, reference_flux_pipeline, torch_threads
    from tests.test_flux_pipeline import PROMPT, _reference_image

    root = tmp_path / "models"
    checkpoint = write_random_flux_checkpoint(root / "checkpoints" / "flux-dev.safetensors", "dev", seed=3)
    linear = {k.removesuffix(".weight"): tuple(v.shape) for k, v in bfl_to_diffusers(
        random_flux_transformer_state_dict("dev", "tiny", dtype=torch.float32), CFG).items()
        if k.endswith(".weight") and v.ndim == 2}
    (root / "loras").mkdir()
    # sd-scripts' default: the double and single blocks, and CLIP-L. (diffusers 0.42's kohya converter returns
    # img_in, txt_in, time_in, vector_in, guidance_in and final_layer without the "transformer." prefix, and
    # load_lora_adapter keeps only prefixed keys, so load_lora_weights would drop them; we apply them, as
    # ComfyUI does, and test_each_naming_merges_as_diffusers_reads_it checks them against the converter.)
    kohya = {k: v for k, v in random_flux_lora_state_dict("kohya", seed=11, strength=0.5, text_encoder=True).items()
             if k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_"))}
    files = {
        "flux_kohya": save_tensors(kohya, root / "loras" / "flux_kohya.safetensors"),
        "flux_peft": save_tensors(random_flux_lora_state_dict("diffusers", seed=12, strength=0.5, text_encoder=True,
                                                              diffusers_names=linear),
                                  root / "loras" / "flux_peft.safetensors"),
    }
    job = {"model": "flux-dev", "steps": 3, "seed": 11, "width": 64, "height": 64}
    jobs = [{**job, "prompt": PROMPT + " <lora:flux_kohya:0.8>"},
            {**job, "prompt": PROMPT, "loras": [{"name": "flux_peft", "weight": 1.0, "te_weight": 0.5}]}]
    with torch_threads(1):
        paths, said = run_jobs(jobs, root, tmp_path, monkeypatch)
        assert len(paths) == 2 and "match no layer" not in said, said

        pipe = reference_flux_pipeline(checkpoint, "dev")
        plain_weights = {role: {k: v.clone() for k, v in getattr(pipe, role).state_dict().items()}
                         for role in ("transformer", "text_encoder")}
        req = read_request(paths[0])
        req = req.replace(prompt=strip_tags(req.prompt), guidance=None)
        plain = _reference_image(pipe, req, "dev")
        for path, (name, unet, te) in zip(paths, (("flux_kohya", 0.8, 0.8), ("flux_peft", 1.0, 0.5))):
            for role, state in plain_weights.items():
                getattr(pipe, role).load_state_dict(state)
            _merge_into_flux_pipeline(pipe, files[name], unet, te)
            expected = _reference_image(pipe, req, "dev")
            ours = Image.open(path).convert("RGB")
            with_lora, without = psnr(ours, expected), psnr(ours, plain)
            print(f"Flux.1 --batch with LoRA {name} vs FluxPipeline with it: {with_lora:.1f} dB (without: {without:.1f})")
            assert with_lora >= 40
            assert without < with_lora - 5  # the LoRA visibly changed the image
        for role, state in plain_weights.items():
            getattr(pipe, role).load_state_dict(state)
        _merge_into_flux_pipeline(pipe, files["flux_peft"], 1.0, 0.0)
        transformer_only = psnr(ours, _reference_image(pipe, req, "dev"))
        print(f"... against FluxPipeline with the transformer part only: {transformer_only:.1f} dB")
        assert transformer_only < with_lora - 5  # the text-encoder LoRA is applied, at its own weight
