"""SDXL LoRAs: the key map (kohya LDM and diffusers block names, lora_te1_/lora_te2_ with bigG's q/k/v on
OpenCLIP's packed in_proj, PEFT unet./text_encoder./text_encoder_2.), merged weights against diffusers' merge
of the same files, and the runner's images against ``StableDiffusionXLPipeline`` with the LoRAs merged."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from core.lora.check import check_lora
from core.lora.files import LoraFileCache, read_lora
from core.lora.patch import activate
from core.lora.tags import LoraRef, strip_tags
from core.models.testing import write_random_checkpoint, write_random_lora
from core.pipeline import PipelineRunner, generate, load_model
from core.request import GenerationRequest

pytest.importorskip("diffusers")
from tests.reference import (  # noqa: E402
    SDXL_BIG_G_PREFIX,
    UNET_PREFIX,
    diffusers_unet_config,
    merge_lora_reference,
    psnr,
    reference_sdxl_pipeline,
    torch_threads,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "xl.safetensors", "sdxl", "tiny", seed=5, dtype=torch.float32)
    write_random_lora(root / "loras" / "xl_kohya.safetensors", "sdxl", fmt="kohya", seed=1, strength=0.5)
    write_random_lora(root / "loras" / "xl_peft.safetensors", "sdxl", fmt="peft", seed=2, rank=8, strength=0.5)
    return root


@pytest.fixture(scope="module")
def checkpoint(models) -> Path:
    return models / "checkpoints" / "xl.safetensors"


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return reference_sdxl_pipeline(checkpoint)


@contextmanager
def merged(pipe, path: Path, unet: float, te: float | None = None):
    """diffusers' pipeline with the LoRA merged for the block's duration (the plain weights put back after)."""
    saved = {role: {k: v.clone() for k, v in getattr(pipe, role).state_dict().items()}
             for role in ("unet", "text_encoder", "text_encoder_2")}
    merge_lora_reference(pipe, path, unet, te)
    try:
        yield pipe
    finally:
        for role, state in saved.items():
            getattr(pipe, role).load_state_dict(state)


def _diffusers_named(model, pipe) -> dict[str, torch.Tensor]:
    """Our merged SDXL networks under diffusers/transformers names, through diffusers' own converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    from core.models.unet import UNetConfig

    parts = model.checkpoint.components
    unet_sd = parts["unet"].state_dict()
    config = diffusers_unet_config(UNetConfig.from_state_dict({k: v.shape for k, v in unet_sd.items()}),
                                   sdxl_time_embed_dim=pipe.unet.config.addition_time_embed_dim)
    out = {"unet." + k: v for k, v in convert_ldm_unet_checkpoint(
        {UNET_PREFIX + k: v for k, v in unet_sd.items()}, config).items()}
    out.update({"text_encoder." + k.removeprefix("text_model."): v for k, v in parts["text_encoder"].state_dict().items()})
    big_g = {SDXL_BIG_G_PREFIX + k: v for k, v in parts["text_encoder_2"].state_dict().items()}
    converted = convert_open_clip_checkpoint(pipe.text_encoder_2, big_g, prefix=SDXL_BIG_G_PREFIX)
    out.update({"text_encoder_2." + k.removeprefix("text_model."): v for k, v in converted.items()})
    return out


def _reference_named(pipe) -> dict[str, torch.Tensor]:
    return {f"{role}.{k.removeprefix('text_model.')}": v.clone()
            for role in ("unet", "text_encoder", "text_encoder_2")
            for k, v in getattr(pipe, role).state_dict().items()}


@pytest.mark.parametrize("name", ["xl_kohya", "xl_peft"])
def test_every_key_matches_and_the_merge_equals_diffusers(models, checkpoint, pipe, name):
    """kohya (LDM block names, lora_te1_/lora_te2_) and PEFT (diffusers names): every module lands where
    diffusers puts it, bigG's q/k/v in row blocks of OpenCLIP's packed in_proj."""
    path = models / "loras" / f"{name}.safetensors"
    assert check_lora(path, checkpoint, name, "xl") == []  # every key found a layer (the header-only check)
    ours = load_model(checkpoint, compute_hash=False)
    warnings = activate(ours.loras, [LoraRef(name, 0.9, te_weight=0.6)], lambda n: path, LoraFileCache())
    lora = read_lora(path)
    assert warnings == [] and not lora.stray
    assert {role for role, _ in ours.loras._merged} == {"unet", "text_encoder", "text_encoder_2"}
    plain = _reference_named(pipe)
    with merged(pipe, path, 0.9, 0.6):
        expected = _reference_named(pipe)
    got = _diffusers_named(ours, pipe)
    changed = [k for k in expected if not torch.equal(expected[k], plain[k])]
    assert any(".self_attn.k_proj." in k for k in changed if k.startswith("text_encoder_2."))  # bigG's in_proj
    assert len(changed) == len(lora.modules)
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), key


def test_runner_with_kohya_and_peft_loras_at_once_matches_diffusers(models, pipe):
    """The runner (what ``darkroom --batch`` drives) with a kohya LoRA as a prompt tag and a PEFT one in the
    ``loras`` field of the same job, against ``StableDiffusionXLPipeline`` with both files merged at the same
    scales."""
    req = GenerationRequest(model="xl", prompt="a lighthouse at dusk <lora:xl_kohya:0.8>", negative_prompt="blurry",
                            sampler="euler", schedule="normal", steps=4, cfg=6.0, seed=11, width=64, height=64,
                            loras=[{"name": "xl_peft", "weight": 0.7}])
    runner = PipelineRunner([models])
    model = runner.ensure_model(req)
    runner.apply_loras(model, req)
    ours = generate(model, req)[0][0]

    def reference():
        return pipe(prompt=strip_tags(req.prompt), negative_prompt=req.negative_prompt,
                    num_inference_steps=req.steps, guidance_scale=req.cfg,
                    generator=torch.Generator().manual_seed(req.seed), width=64, height=64).images[0]

    plain = reference()
    with merged(pipe, models / "loras" / "xl_kohya.safetensors", 0.8), \
            merged(pipe, models / "loras" / "xl_peft.safetensors", 0.7):
        with_loras, without = psnr(ours, reference()), psnr(ours, plain)
    print(f"SDXL kohya + PEFT: PSNR {with_loras:.1f} dB vs diffusers with the LoRAs, {without:.1f} dB without")
    assert with_loras >= 40
    assert without < with_loras - 5
