"""Z-Image end to end from the files users keep: ``darkroom --batch`` on a ComfyUI split set (DiT, Qwen3-4B, Flux.1
VAE in their own folders, parts auto-picked) against diffusers' ``ZImagePipeline`` built from the same weights (same
seed, steps and noise; Turbo's defaults and Base's CFG with a negative prompt), the all-in-one checkpoint giving the
split set's image bit for bit, and a GGUF DiT (architecture ``lumina2``) with a GGUF Qwen3 (llama.cpp names)
and an fp8 DiT staying close to it. Plus the shift-3 sigmas against the shipped scheduler config and the conditioner's ragged
caption lengths through CFG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.metadata import infotext_to_request, read_request
from core.models import testing
from core.models.conditioning import EncoderSettings
from core.models.families import get_family
from core.models.safetensors_writer import save_tensors
from core.request import GenerationRequest, with_family_defaults
from core.sampling.noise import NoiseSampler
from core.sampling.schedules import get_sigmas
from tests.batch_harness import run_jobs
from tests.reference import diffusers_vae_config, psnr, torch_threads

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from tests.test_qwen3 import reference_config  # noqa: E402
from tests.test_zimage import reference_model, to_diffusers  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"
ZIMAGE = Path("/work/shared/data/model-configs/Tongyi-MAI/Z-Image-Turbo")
TOKENIZER = Path("/work/shared/data/tokenizers/qwen3")
PREFIXES = {"model": "model.diffusion_model.", "qwen3_4b": "text_encoders.qwen3_4b.transformer.", "vae": "vae."}
# Hugging Face Qwen3 names -> llama.cpp's (the inverse of core.models.gguf_header.LLAMA_NAME_MAP)
_TO_LLAMA = (("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("model.layers.", "blk."),
             ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
             ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"), ("self_attn.q_proj", "attn_q"),
             ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
             ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"), ("mlp.gate_proj", "ffn_gate"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _q8(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: "Q8_0" for k, v in tensors.items() if v.dim() == 2 and v.shape[-1] % 32 == 0}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    from core.models.gguf_header import state_name

    root = tmp_path_factory.mktemp("ComfyUI")
    files = testing.write_random_zimage_split_set(root, seed=3)
    # the same tensors as one all-in-one checkpoint
    combined = {PREFIXES[name] + k: v for name in PREFIXES for k, v in load_file(files[name]).items()}
    (root / "models" / "checkpoints").mkdir()
    save_tensors(combined, root / "models" / "checkpoints" / "z_image_turbo_aio.safetensors")
    # the DiT as ComfyUI-GGUF writes it (architecture lumina2, ComfyUI names) and Qwen3 as llama.cpp does
    dit = {k: v.float() for k, v in load_file(files["model"]).items()}
    testing.write_random_gguf(root / "models" / "unet" / "z_image_turbo-Q8_0.gguf", dit, _q8(dit), arch="lumina2")
    # and as ComfyUI's fp8 repackage (matrices float8_e4m3fn, norms and biases bf16)
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in load_file(files["model"]).items()}
    save_tensors(fp8, root / "models" / "diffusion_models" / "z_image_turbo_fp8_e4m3fn.safetensors")
    qwen = {}
    for key, value in load_file(files["qwen3_4b"]).items():
        name = key
        for hf, llama in _TO_LLAMA:
            name = name.replace(hf, llama)
        assert state_name(name, "qwen3") == key  # what the loader maps it back to
        qwen[name] = value.float()
    testing.write_random_gguf(root / "models" / "text_encoders" / "Qwen3-4B-Q8_0.gguf", qwen, _q8(qwen), arch="qwen3")
    return root / "models"


def reference_pipeline(models_dir: Path):
    """``ZImagePipeline`` over the split set: ``ZImageTransformer2DModel`` through diffusers' single-file converter,
    transformers' ``Qwen3Model`` (the ``model.`` prefix dropped), ``AutoencoderKL`` through
    ``convert_ldm_vae_checkpoint``, the real Qwen3 tokenizer and the shipped scheduler config, all fp32."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from core.models.qwen3 import Qwen3Config
    from core.models.vae import VAEConfig
    from core.models.zimage import ZImageConfig

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in load_file(str(path)).items()}

    dit = weights(models_dir / "diffusion_models" / "z_image_turbo_bf16.safetensors")
    transformer = reference_model(ZImageConfig.from_state_dict({k: tuple(v.shape) for k, v in dit.items()}))
    transformer.load_state_dict(to_diffusers(dit), strict=True)

    qwen = weights(models_dir / "text_encoders" / "qwen_3_4b.safetensors")
    cfg = Qwen3Config.from_state_dict({k: tuple(v.shape) for k, v in qwen.items()})
    text_encoder = transformers.Qwen3Model(reference_config(cfg))
    text_encoder.load_state_dict({k.removeprefix("model."): v for k, v in qwen.items()}, strict=True)

    ae = weights(models_dir / "vae" / "ae.safetensors")
    vae_config = diffusers_vae_config(VAEConfig.from_state_dict({k: tuple(v.shape) for k, v in ae.items()},
                                                                family="zimage"))
    vae = AutoencoderKL(**vae_config, force_upcast=False)
    vae.load_state_dict(convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ae.items()}, vae_config),
                        strict=True)

    scheduler_config = json.loads((ZIMAGE / "scheduler" / "scheduler_config.json").read_text())
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**{k: v for k, v in scheduler_config.items() if k[0] != "_"}),
        vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(TOKENIZER)), transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_image(pipe, req: GenerationRequest) -> Image.Image:
    """ZImagePipeline fed our starting noise (NoiseSampler: per-image CPU generator, [16, h/8, w/8]); our cfg is
    its guidance_scale + 1 (it guides with pos + g (pos - neg)), cfg 1 = its 0 (no negative pass)."""
    noise = NoiseSampler([req.seed], (16, req.height // 8, req.width // 8)).initial()
    return pipe(prompt=req.prompt, negative_prompt=req.negative_prompt or None, guidance_scale=req.cfg - 1.0,
                num_inference_steps=req.steps, height=req.height, width=req.width, latents=noise).images[0]


def test_sigmas_are_the_shipped_schedulers_shift_3():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = json.loads((ZIMAGE / "scheduler" / "scheduler_config.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if k[0] != "_"})
    schedule = get_family("zimage").sampling.flow_schedule("base", 64 * 64)
    for steps in (8, 3, 50):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=0.9)  # mu ignored (static)
        ours = get_sigmas("simple", schedule, steps)
        assert torch.allclose(ours, scheduler.sigmas.float(), atol=1e-6), (steps, ours, scheduler.sigmas)
    want = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0]  # families-2026.md §2.4
    assert torch.allclose(get_sigmas("normal", schedule, 8), torch.tensor(want), atol=1e-6)


def test_turbo_defaults_and_the_presets():
    from core.presets import load_presets

    turbo = with_family_defaults(GenerationRequest(model="x"), "zimage")
    assert (turbo.steps, turbo.cfg) == (8, 1.0)
    assert with_family_defaults(GenerationRequest(model="x", cfg=4.0), "zimage", given={"cfg"}).cfg == 4.0
    presets = {p.name: p for p in load_presets()[0] if p.builtin and p.family == "zimage"}
    assert set(presets) == {"z-image-turbo", "z-image-base"}
    assert (presets["z-image-turbo"].fields["steps"], presets["z-image-turbo"].fields["cfg"]) == (8, 1.0)
    assert presets["z-image-base"].fields["cfg"] == 6.0  # ZImagePipeline's guidance_scale 5


def test_batch_cli_from_split_files_matches_zimage_pipeline(models_dir, tmp_path, monkeypatch):
    """One ``darkroom --batch``: Turbo's defaults on the split set (steps and cfg left out: 8, 1), the z-image-base
    preset (CFG 6 and a negative prompt, 3 steps here, not square), the all-in-one file, the GGUF pair, fp8."""
    job = {"prompt": PROMPT, "seed": 11, "width": 64, "height": 64}
    jobs = [
        {"model": "z_image_turbo_bf16", **job},
        {"model": "z_image_turbo_bf16", "preset": "z-image-base", "prompt": PROMPT, "negative_prompt": "blurry, lowres",
         "steps": 3, "seed": 12, "width": 80, "height": 64},
        {"model": "z_image_turbo_aio", **job},
        {"model": "z_image_turbo-Q8_0", **job},
        {"model": "z_image_turbo_fp8_e4m3fn", **job, "text_encoders": ["qwen_3_4b.safetensors"]},
    ]
    (turbo, base, aio, gguf, fp8), said = run_jobs(jobs, models_dir, tmp_path, monkeypatch)

    assert "qwen_3_4b.safetensors" in said and "ae.safetensors" in said, said  # auto-picked, said
    assert "Qwen3-4B-Q8_0.gguf" in said  # for the GGUF DiT: the GGUF text encoder
    info = Image.open(turbo).text["parameters"]
    assert "qwen_3_4b.safetensors" in info and "Steps: 8" in info and "CFG scale: 1" in info, info
    assert "Shift: 3" in info and "Distilled CFG Scale" not in info  # Forge Neo's key for the flow shift
    assert set(infotext_to_request(info).text_encoders) == {"qwen_3_4b.safetensors"}

    pipe = reference_pipeline(models_dir)
    for path in (turbo, base):
        req = read_request(path)
        ours = Image.open(path).convert("RGB")
        assert ours.size == (req.width, req.height)
        assert max(hi - lo for lo, hi in ours.getextrema()) > 50  # an image, not a flat field
        value = psnr(ours, _reference_image(pipe, req))
        print(f"Z-Image --batch vs ZImagePipeline (steps {req.steps}, cfg {req.cfg}): {value:.1f} dB")
        assert value >= 40
    assert (read_request(turbo).steps, read_request(turbo).cfg) == (8, 1.0)
    assert (read_request(base).cfg, read_request(base).negative_prompt) == (6.0, "blurry, lowres")

    a = Image.open(turbo).convert("RGB")
    assert Image.open(aio).convert("RGB").tobytes() == a.tobytes()  # the same weights, from three files or one
    value = psnr(Image.open(gguf).convert("RGB"), a)
    print(f"Z-Image Q8_0 DiT + Q8_0 Qwen3 vs bf16: {value:.1f} dB")
    assert value >= 30
    value = psnr(Image.open(fp8).convert("RGB"), a)
    print(f"Z-Image fp8 DiT vs bf16: {value:.1f} dB")
    assert value >= 30


@pytest.fixture(scope="module")
def aio(models_dir):
    from core.pipeline import load_model

    return load_model(models_dir / "checkpoints" / "z_image_turbo_aio.safetensors", compute_hash=False)


def test_cfg_batches_captions_of_different_lengths(aio):
    """The prompt and the negative prompt have their own lengths; one [cond; uncond] call gives each image what
    it gets alone (the padding to 512 is cut off before the DiT)."""
    from core.models.conditioning import Conditioning

    model = aio
    cond = model.conditioner.encode(PROMPT, EncoderSettings())
    uncond = model.conditioner.encode("", EncoderSettings())
    assert cond.context.shape == (1, 512, 32) and int(cond.extras["cap_lens"]) > int(uncond.extras["cap_lens"])
    assert not cond.context[0, int(cond.extras["cap_lens"]):].any()
    denoiser = model.denoiser()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.7])
    with torch.inference_mode():
        both = denoiser(x, sigma, **Conditioning.cat([cond, uncond]).model_kwargs())
        alone = [denoiser(x[i : i + 1], sigma[:1], **c.model_kwargs()) for i, c in enumerate((cond, uncond))]
    assert torch.allclose(both, torch.cat(alone), atol=1e-5)
    assert not torch.allclose(alone[0], denoiser(x[:1], sigma[:1], **uncond.model_kwargs()), atol=1e-3)


def test_qwen3_leaves_the_gpu_after_encoding_and_a_repeated_prompt_is_free(aio, monkeypatch):
    """The memory policy for a 4B text encoder: on the device only while encoding, back on the CPU afterwards (a
    simulated GPU), and not run at all for a prompt the cache has."""
    from core.pipeline import PromptCache
    from tests.test_flux_pipeline import _cpu_only

    model = aio
    conditioner = model.conditioner
    moves: list[str] = []
    monkeypatch.setattr(conditioner, "device", torch.device("cuda"))
    monkeypatch.setattr(conditioner.qwen, "to", lambda *a, **k: moves.append(str(a[0])) or conditioner.qwen)
    monkeypatch.setattr(torch.Tensor, "to", _cpu_only(torch.Tensor.to))
    cache, runs = PromptCache(), conditioner.runs
    cache.encode(model, "a quiet harbour", EncoderSettings())
    assert moves == ["cuda", "cpu"]
    cache.encode(model, "a quiet harbour", EncoderSettings())
    assert conditioner.runs == runs + 1 and cache.hits == 1 and moves == ["cuda", "cpu"]


def test_a_qwen3_file_with_its_lm_head_is_the_same_text_encoder(aio, models_dir, tmp_path):
    """A Qwen3ForCausalLM export that kept ``lm_head.weight`` (logits, which no encoder uses) loads as the same
    text encoder: the prompt's features are those of ComfyUI's file without it."""
    from core.pipeline import load_model

    qwen = load_file(models_dir / "text_encoders" / "qwen_3_4b.safetensors")
    qwen["lm_head.weight"] = qwen["model.embed_tokens.weight"].clone()
    path = save_tensors(qwen, tmp_path / "Qwen3-4B-causal-lm.safetensors")
    model = load_model(models_dir / "diffusion_models" / "z_image_turbo_bf16.safetensors", compute_hash=False,
                       parts={"text_encoder": path, "vae": models_dir / "vae" / "ae.safetensors"})
    got, want = (m.conditioner.encode(PROMPT, EncoderSettings()) for m in (model, aio))
    assert torch.equal(got.context, want.context) and torch.equal(got.extras["cap_lens"], want.extras["cap_lens"])


def test_a_prompt_past_512_qwen3_tokens_is_said_to_be_cut(caplog):
    import logging

    from core.models.conditioning import EncoderSettings
    from core.models.qwen3 import Qwen3, Qwen3Config
    from core.models.qwen3_conditioner import Qwen3Conditioner

    class Probe(Qwen3Conditioner):
        template = "zimage"

        def features(self, input_ids, attention_mask):
            return torch.zeros(1, int(attention_mask.sum()), 4)

    qwen = Qwen3(Qwen3Config.preset("tiny"))
    conditioner = Probe({"text_encoder": qwen, "unet": torch.nn.Linear(1, 1)})
    with caplog.at_level(logging.WARNING, logger="core.models.qwen3_conditioner"):
        conditioner.encode("a red fox", EncoderSettings())
        assert conditioner.truncated == 0 and not caplog.records
        conditioner.encode(" ".join(["fox"] * 600), EncoderSettings())
    assert conditioner.truncated > 0
    assert "Qwen3 tokens longer than the 512" in caplog.records[-1].getMessage()
