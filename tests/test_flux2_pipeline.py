"""FLUX.2 [klein] end to end: ``darkroom --batch`` on a Comfy-Org split set (BFL transformer, ``qwen_3_4b``,
``flux2-vae`` in their folders, parts auto-picked) against diffusers' ``Flux2KleinPipeline`` built from the same
weights (distilled at the family defaults; base-style CFG 2 against the empty prompt), the same set as one
all-in-one file, BFL's fp8 layout and a GGUF Q8_0 transformer; the schedule the pipeline computes, img2img and
hires fix in the 128-channel latent space, the tiled VAE, the preview factors, the LoRA key map against diffusers'
converter, and the part a variant takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.errors import CheckpointError
from core.metadata import read_request
from core.models import testing
from core.models.families import get_family
from core.models.safetensors_writer import save_tensors
from core.pipeline import generate, load_model
from core.request import GenerationRequest
from core.sampling.noise import NoiseSampler
from core.sampling.schedules import flux2_sigmas, get_sigmas
from tests.batch_harness import run_jobs
from tests.reference import diffusers_flux2_config, psnr, rel_err, torch_threads

pytest.importorskip("diffusers")
import transformers  # noqa: E402
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: E402

PROMPT = "a red fox in fresh snow, morning light"
CONFIGS = Path("/work/shared/data/model-configs/black-forest-labs/FLUX.2-klein-4B")
TOKENIZER = Path("/work/shared/data/tokenizers/qwen3")
PREFIXES = {"model": "model.diffusion_model.", "qwen3": "text_encoders.qwen3_4b.transformer.", "vae": "vae."}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ComfyUI")
    files = testing.write_random_flux2_split_set(root, seed=5)
    models = root / "models"
    combined = {PREFIXES[name] + k: v for name in PREFIXES for k, v in load_file(files[name]).items()}
    (models / "checkpoints").mkdir()
    files["combined"] = save_tensors(combined, models / "checkpoints" / "flux-2-klein-4b-aio.safetensors")
    # BFL's fp8 file of the same weights (another folder: the Forge layout), and a GGUF Q8_0 (arch "flux")
    files["fp8"] = testing.write_random_flux2_split_set(root, "forge", seed=5, transformer_dtype=torch.float8_e4m3fn,
                                                        parts=())["model"]
    weights = {k: v.float() for k, v in load_file(files["model"]).items()}
    types = {k: "Q8_0" for k, v in weights.items() if v.dim() == 2 and v.shape[-1] % 32 == 0}
    files["gguf"] = testing.write_random_gguf(models / "unet" / "flux-2-klein-4b-Q8_0.gguf", weights, types)
    files["root"] = models
    return files


def reference_pipeline(files: dict[str, Path], is_distilled: bool) -> Flux2KleinPipeline:
    """Flux2KleinPipeline over the split files: the transformer through diffusers' single-file converter,
    transformers' Qwen3ForCausalLM, AutoencoderKLFlux2 through the LDM converter (quant convs moved to the top
    level, bn.* kept), the shipped scheduler config and the real Qwen3 tokenizer; all fp32."""
    from core.models.flux2 import Flux2Config
    from core.models.flux2_vae import Flux2VAEConfig
    from core.models.qwen3 import Qwen3Config

    bfl = {k: v.float() for k, v in load_file(files["model"]).items()}
    cfg = Flux2Config.from_state_dict({k: tuple(v.shape) for k, v in bfl.items()})
    transformer = Flux2Transformer2DModel(**diffusers_flux2_config(cfg))  # klein: guidance_embed False
    transformer.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(bfl), strict=True)

    qwen = {k: v.float() for k, v in load_file(files["qwen3"]).items()}
    q = Qwen3Config.from_state_dict({k: tuple(v.shape) for k, v in qwen.items()})
    text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
        num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
        num_key_value_heads=q.num_key_value_heads, head_dim=q.head_dim, rms_norm_eps=q.rms_norm_eps,
        rope_theta=q.rope_theta, max_position_embeddings=40960, tie_word_embeddings=True))
    missing, unexpected = text_encoder.load_state_dict(qwen, strict=False)  # lm_head is tied to the embedding
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)

    vae_sd = load_file(files["vae"])
    vc = Flux2VAEConfig.from_state_dict({k: tuple(v.shape) for k, v in vae_sd.items()})
    vae = AutoencoderKLFlux2(block_out_channels=[vc.ch * m for m in vc.ch_mult],
                             decoder_block_out_channels=[vc.decoder_ch * m for m in vc.ch_mult],
                             layers_per_block=vc.num_res_blocks, latent_channels=vc.z_channels)
    ldm = {k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."): v
           for k, v in vae_sd.items()}
    converted = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    converted.update({k: v for k, v in vae_sd.items() if k.startswith("bn.")})
    vae.load_state_dict(converted, strict=True)

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text()))
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                              tokenizer=transformers.AutoTokenizer.from_pretrained(str(TOKENIZER)),
                              transformer=transformer.eval(), is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(pipe: Flux2KleinPipeline, req: GenerationRequest) -> Image.Image:
    """The pipeline fed our starting noise (NoiseSampler: per-image CPU generator, [128, h/16, w/16]); a distilled
    model for cfg 1 (one forward), a base one (CFG against the empty prompt) above."""
    noise = NoiseSampler([req.seed], (128, req.height // 16, req.width // 16)).initial()
    pipe.register_to_config(is_distilled=req.cfg <= 1)
    return pipe(prompt=req.prompt, height=req.height, width=req.width, num_inference_steps=req.steps,
                guidance_scale=req.cfg, latents=noise).images[0]


def _run(files, tmp_path, monkeypatch, jobs: list[dict]) -> tuple[list[Path], str]:
    return run_jobs(jobs, files["root"], tmp_path, monkeypatch)


def test_batch_from_split_files_matches_flux2_klein_pipeline(files, tmp_path, monkeypatch):
    """Distilled at the family's defaults (4 steps, cfg 1: one forward), base-style CFG 2 against the empty prompt
    (the pipeline's negative), each >= 40 dB of Flux2KleinPipeline; the all-in-one file gives the split set's image
    bit for bit; BFL's fp8 and a GGUF Q8_0 transformer stay close to it."""
    base = {"prompt": PROMPT, "seed": 17, "width": 64, "height": 64}
    jobs = [{"model": "flux-2-klein-4b", **base},
            {"model": "flux-2-klein-4b", **base, "cfg": 2.0, "steps": 3, "width": 80, "seed": 18},
            {"model": "flux-2-klein-4b-aio", **base},
            {"model": "flux-2-klein-4b-fp8", **base},
            {"model": "flux-2-klein-4b-Q8_0", **base}]
    paths, said = _run(files, tmp_path, monkeypatch, jobs)
    assert len(paths) == 5
    assert "qwen_3_4b.safetensors" in said and "flux2-vae.safetensors" in said, said
    images = [Image.open(p).convert("RGB") for p in paths]
    pipe = reference_pipeline(files, is_distilled=True)
    for path, image, job in zip(paths[:2], images, jobs):
        req = read_request(path)
        assert (req.steps, req.cfg) == ((4, 1.0) if "cfg" not in job else (3, 2.0))  # klein's defaults
        assert image.size == (job["width"], job["height"])
        assert max(hi - lo for lo, hi in image.getextrema()) > 50  # an image, not a flat field
        value = psnr(image, reference_image(pipe, req))
        print(f"FLUX.2 klein --batch vs Flux2KleinPipeline (cfg {req.cfg}): {value:.1f} dB")
        assert value >= 40
        info = Image.open(path).text["parameters"]
        assert "qwen_3_4b" in info and "flux2-vae" in info and "Distilled CFG Scale" not in info, info
    assert images[2].tobytes() == images[0].tobytes()  # the same weights in one file or three
    for name, image in (("fp8", images[3]), ("Q8_0", images[4])):
        value = psnr(image, images[0])
        print(f"FLUX.2 klein {name} transformer vs bf16: {value:.1f} dB")
        assert value >= 30


@pytest.fixture(scope="module")
def model(files):
    return load_model(files["model"], parts={"text_encoder": files["qwen3"], "vae": files["vae"]}, compute_hash=False)


def test_schedule_is_the_pipelines_for_the_image_and_step_count(model):
    for steps, latent in ((4, (1, 128, 64, 64)), (50, (1, 128, 64, 64)), (4, (1, 128, 4, 5)), (8, (1, 128, 80, 80))):
        tokens = latent[2] * latent[3]
        schedule = model.sigma_schedule(torch.zeros(latent), steps)
        torch.testing.assert_close(get_sigmas("simple", schedule, steps), flux2_sigmas(steps, tokens),
                                   rtol=0, atol=1e-6)
    # 1024x1024, 4 steps: families-2026.md's values from diffusers' scheduler
    sigmas = get_sigmas("simple", model.sigma_schedule(torch.zeros(1, 128, 64, 64), 4), 4)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.967384, 0.908144, 0.7672, 0.0]), atol=1e-5)


def test_img2img_hires_and_tiled_vae_in_the_128_channel_space(model, tmp_path):
    from core.request import HiresFix

    request = GenerationRequest(model="x", prompt=PROMPT, steps=2, cfg=1.0, seed=3, width=64, height=64,
                                hires=HiresFix(scale=1.5, steps=2, denoise=0.5))
    (image, _), = generate(model, request)
    assert image.size == (96, 96)
    image.save(tmp_path / "init.png")
    (image, _), = generate(model, request.replace(hires=None, init_image=str(tmp_path / "init.png"), denoise=0.6))
    assert image.size == (64, 64)
    vae = model.checkpoint.vae
    pixels = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        z = vae.encode(pixels, sample=False)
        # random weights and pixels: GroupNorm statistics per tile differ more than a real VAE's on a photo
        tiled = vae.decode_tiled(z, tile=6, overlap=2)
        assert tiled.shape == (1, 3, 96, 128)
        assert rel_err(vae.encode(pixels, sample=False, tile=4), z) < 0.3
        assert rel_err(tiled, vae.decode(z)) < 0.5
        assert torch.equal(vae.encode(pixels, sample=False, tile=16), z)
        assert torch.equal(vae.decode_tiled(z, tile=16, overlap=4), vae.decode(z))  # one tile: the plain decode


def test_preview_is_comfyuis_32_channel_fit_at_cell_resolution():
    from core.models.families.flux2 import _RGB_32, RGB_BIAS
    from core.models.flux2_vae import unpatchify
    from core.models.latent_formats import latent_to_rgb

    x = torch.randn(128, 6, 5, generator=torch.Generator().manual_seed(2))
    full = unpatchify(x[None])[0].movedim(0, -1) @ torch.tensor(_RGB_32) + torch.tensor(RGB_BIAS)  # [12, 10, 3]
    cells = full.reshape(6, 2, 5, 2, 3).mean(dim=(1, 3))
    want = cells.clamp(-1, 1).add(1).mul(127.5)
    assert (latent_to_rgb(x, "flux2").float() - want).abs().max() <= 0.51


def test_lora_names_land_where_diffusers_converter_puts_the_weights():
    """Every diffusers Flux2Transformer2DModel linear, under ``transformer.``, maps to the rows of our layer that
    diffusers' own BFL -> diffusers converter copies into it (split qkv, final shift/scale swap)."""
    from core.lora.flux2_keys import lora_keys
    from core.models.flux2 import Flux2, Flux2Config

    cfg = Flux2Config.preset("tiny")
    with torch.device("meta"):
        ours = Flux2(cfg)
    bfl = testing.random_state_dict(ours, seed=1)
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    names = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)]
    keys = lora_keys({"unet": names})
    diffusers_linears = [k.removesuffix(".weight") for k, v in converted.items() if v.dim() == 2]
    assert len(diffusers_linears) == 2 + 2 + 3 + 1 + 1 + 2 * 12 + 2 * 2  # top, time, modulations, blocks, out
    for name in diffusers_linears:
        target = keys["transformer." + name]
        weight = bfl[target.weight]
        if target.rows is not None:
            d = weight.shape[1]
            start, stop = target.rows
            weight = weight[start * d : None if stop is None else stop * d]
        if target.swap_halves:
            weight = torch.cat(weight.chunk(2)[::-1])
        assert torch.equal(weight, converted[name + ".weight"]), name
    for bfl_name in names:  # ComfyUI / BFL and kohya spellings
        assert keys["diffusion_model." + bfl_name].module == bfl_name
        assert keys["lora_unet_" + bfl_name.replace(".", "_")].module == bfl_name


def test_the_text_encoder_a_variant_takes_and_a_mismatch_named(files, model):
    from core.models.flux2_conditioner import Flux2KleinConditioner
    from core.models.qwen3 import Qwen3, Qwen3Config
    from core.models.split import _part_components

    spec = get_family("flux2")
    kinds = {v: [c.part for c in _part_components(spec, v)] for v in ("klein-4b", "klein-9b", "d64")}
    assert kinds == {"klein-4b": ["qwen3_4b", "flux2_vae"], "klein-9b": ["qwen3_8b", "flux2_vae"],
                     "d64": ["qwen3_4b", "flux2_vae"]}
    wide = Qwen3(Qwen3Config(**{**spec.component("text_encoder").presets["tiny"], "hidden_size": 48}))
    with pytest.raises(CheckpointError, match="Qwen3 48 wide.*144 features.*reads 96"):
        Flux2KleinConditioner({**model.checkpoint.components, "text_encoder": wide})


def test_memory_estimate_counts_one_token_per_latent_cell(model):
    from core.accel.memory import denoiser_activations

    dit = model.checkpoint.unet
    # a 1024x1024 image: Flux.1's 128x128 latent in 2x2 patches and FLUX.2's 64x64 cells are both 4096 tokens
    assert denoiser_activations(dit, "flux2", (64, 64), 1, 4) == denoiser_activations(dit, "flux", (128, 128), 1, 4)
    assert denoiser_activations(dit, "flux2", (64, 64), 1, 4) > 3 * denoiser_activations(dit, "flux", (64, 64), 1, 4)


def test_klein_9b_picks_qwen3_8b_and_4b_picks_qwen3_4b(tmp_path):
    """By the variant's part kind (``Component.variant_parts``), with both encoders in the folder: a stand-in
    registry gives the headers' answers (a real 9B set is 35 GB)."""
    from core.models.registry import ModelFile, ModelInfo
    from core.models.split import resolve_parts

    files = {kind: ModelFile(name, tmp_path / f"{name}.safetensors", 1) for kind, name in
             (("qwen3_4b", "qwen_3_4b"), ("qwen3_8b", "qwen_3_8b"), ("flux2_vae", "flux2-vae"))}

    class Registry:
        variant = ""

        def inspect(self, model):
            return ModelInfo("flux2", "FLUX.2", self.variant, "bfloat16", quant="bf16", split=True)

        def parts_of(self, kind):
            return [files[kind]] if kind in files else []

    registry = Registry()
    for variant, encoder in (("klein-9b", "qwen_3_8b"), ("klein-4b", "qwen_3_4b")):
        registry.variant = variant
        parts = resolve_parts(registry, tmp_path / "model.safetensors")
        assert (parts.parts["text_encoder"].stem, parts.vae.stem) == (encoder, "flux2-vae"), variant


@pytest.mark.parametrize("fmt", ["kohya", "ai-toolkit"])
def test_a_lora_merges_as_diffusers_flux2_loader_reads_it(tmp_path, fmt):
    """A FLUX.2 LoRA (kohya ``lora_unet_*`` with alphas, or ai-toolkit's ``diffusion_model.*`` PEFT factors) merged
    into our transformer through the family's key map equals diffusers' ``Flux2LoraLoaderMixin.lora_state_dict``
    reading merged into diffusers' layers (compared through diffusers' BFL -> diffusers converter)."""
    from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin

    from core.lora.files import LoraFileCache
    from core.lora.patch import LoraPatcher, activate
    from core.lora.tags import LoraRef
    from core.models.flux2 import Flux2, Flux2Config

    cfg = Flux2Config.preset("tiny")
    module = Flux2(cfg)
    module.load_state_dict(testing.random_state_dict(module, seed=3))
    base = {k: v.clone() for k, v in module.state_dict().items()}
    layers = ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
              "double_blocks.1.img_mlp.0", "single_blocks.1.linear1", "single_blocks.0.linear2", "img_in",
              "final_layer.linear")
    g, rank = torch.Generator().manual_seed(4), 4
    tensors: dict[str, torch.Tensor] = {}
    for name in layers:
        out_f, in_f = base[name + ".weight"].shape
        down, up = torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors |= {key + ".lora_down.weight": down, key + ".lora_up.weight": up, key + ".alpha": torch.tensor(2.0)}
        else:
            key = "diffusion_model." + name
            tensors |= {key + ".lora_A.weight": down, key + ".lora_B.weight": up}
    path = save_tensors(tensors, tmp_path / "klein_lora.safetensors")
    patcher = LoraPatcher({"unet": module}, get_family("flux2"))
    warnings = activate(patcher, [LoraRef("klein_lora", 0.8)], lambda name: path, LoraFileCache())
    assert warnings == []
    ours = convert_flux2_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in module.state_dict().items()})

    state_dict = Flux2LoraLoaderMixin.lora_state_dict(dict(tensors))
    state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict
    expected = convert_flux2_transformer_checkpoint_to_diffusers(dict(base))
    for key in [k for k in state_dict if k.endswith(".lora_A.weight")]:
        name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        a, b = state_dict[key].double(), state_dict[key.replace("lora_A", "lora_B")].double()
        expected[name + ".weight"] = (expected[name + ".weight"].double() + 0.8 * (b @ a)).float()
    changed = {k for k in expected if not torch.equal(ours[k], convert_flux2_transformer_checkpoint_to_diffusers(
        dict(base))[k])}
    assert len(changed) >= len(layers) + 4  # both qkv LoRAs patch three diffusers layers each
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_flux1_and_flux2_loras_are_told_apart_by_names_and_widths():
    from core.lora.detect import lora_family

    def kohya(layer: str, out_f: int, in_f: int) -> dict[str, tuple[int, ...]]:
        key = "lora_unet_" + layer.replace(".", "_")
        return {key + ".lora_down.weight": (16, in_f), key + ".lora_up.weight": (out_f, 16), key + ".alpha": ()}

    qkv = kohya("double_blocks.0.img_attn.qkv", 9216, 3072)
    klein4 = {**qkv, **kohya("single_blocks.0.linear1", 27648, 3072), **kohya("single_blocks.0.linear2", 3072, 12288)}
    flux1 = {**qkv, **kohya("single_blocks.0.linear1", 21504, 3072), **kohya("single_blocks.0.linear2", 3072, 15360)}
    assert lora_family(klein4)[0] == "flux2" and lora_family(flux1)[0] == "flux"
    assert lora_family(kohya("double_blocks.0.img_attn.qkv", 12288, 4096))[0] == "flux2"  # klein 9B's width
    assert lora_family(qkv)[0] == "flux"  # 3072-wide attention alone: Flux.1, the common case
    assert lora_family({"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight": (4, 64)})[0] \
        == "flux2"
    assert lora_family({**klein4, **kohya("double_blocks.0.img_mod.lin", 18432, 3072)})[0] == "flux"


def test_an_all_in_one_9b_file_names_its_encoder_after_qwen3_8b():
    from core.models.detect import detect
    from core.models.flux2 import Flux2, Flux2Config

    with torch.device("meta"):
        dit = {"model.diffusion_model." + k: tuple(v.shape)
               for k, v in Flux2(Flux2Config.preset("tiny", "klein-9b")).state_dict().items()}
    for prefix in ("text_encoders.qwen3_8b.transformer.", "text_encoders.qwen3_4b.transformer."):
        qwen = {prefix + "model.embed_tokens.weight": (151936, 32), prefix + "model.layers.0.self_attn.q_norm.weight": (16,)}
        info = detect("klein.safetensors", {**dit, **qwen, "vae.bn.running_mean": (128,)}, {})
        assert (info.family, info.prefixes["text_encoder"]) == ("flux2", prefix)


def test_a_vae_swap_takes_the_flux2_vae_and_refuses_flux1s(files, tmp_path):
    from core.models.checkpoint import load_vae
    from core.models.flux2_vae import Flux2AutoencoderKL

    vae = load_vae(files["vae"], family="flux2")
    assert isinstance(vae, Flux2AutoencoderKL) and torch.equal(vae.bn.running_var, load_file(files["vae"])["bn.running_var"])
    flux1 = save_tensors(testing.random_vae_state_dict("flux"), tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="16 latent channels but FLUX.2 needs a 32-channel VAE"):
        load_vae(flux1, family="flux2")


def test_a_qwen3_too_shallow_for_klein_is_one_message_naming_the_layers():
    """klein reads the states after layers 9, 18 and 27: a Qwen3 with fewer layers (a wrong or cut-down file) is a
    CheckpointError naming them, not an internal error from inside the encoder."""
    from core.models.families.flux2 import QWEN3_TINY, TRANSFORMER_TINY
    from core.models.flux2 import Flux2, Flux2Config
    from core.models.flux2_conditioner import Flux2KleinConditioner
    from core.models.qwen3 import Qwen3, Qwen3Config

    with torch.device("meta"):
        transformer = Flux2(Flux2Config(**TRANSFORMER_TINY))
        shallow = Qwen3(Qwen3Config(**{**QWEN3_TINY, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"a Qwen3 of 3 layers, but klein reads the states after layers 9, 18, 27"):
        Flux2KleinConditioner({"unet": transformer, "text_encoder": shallow})
