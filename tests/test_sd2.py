"""SD2.x end to end on tiny random checkpoints in the real single-file layout (``write_random_checkpoint``):
the OpenCLIP ViT-H encoder and conditioner against transformers through diffusers' single-file converter, the
v/eps guess and the request's override, and ``darkroom --batch`` against diffusers' ``StableDiffusionPipeline``
with the matching Euler ``prediction_type``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from core.errors import RequestError
from core.metadata import format_infotext, infotext_to_request, parse_infotext
from core.models.checkpoint import inspect_checkpoint, load_checkpoint
from core.models.conditioning import EncoderSettings
from core.models.detect import inspect_header
from core.models.families import get_family
from core.models.open_clip_prompt import OpenCLIPConditioner
from core.models.prompt import apply_emphasis, build_chunks
from core.models.testing import iter_random_checkpoint, write_random_checkpoint
from core.pipeline import generate, load_model
from core.request import GenerationRequest

pytest.importorskip("diffusers")
from tests.reference import psnr, reference_sd2_pipeline, reference_sd2_text_encoder, reference_sd2_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, lowres"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for prediction in ("eps", "v"):
        write_random_checkpoint(root / "checkpoints" / f"sd2-{prediction}.safetensors", "sd2", "tiny", seed=5,
                                prediction=prediction)
    return root


def _file(models_dir: Path, prediction: str) -> Path:
    return models_dir / "checkpoints" / f"sd2-{prediction}.safetensors"


@pytest.fixture(scope="module")
def encoders(models_dir):
    """(our conditioner over the file's encoder, transformers' encoder from the same file) in fp32."""
    path = _file(models_dir, "v")
    ours = load_checkpoint(path, dtype=torch.float32)
    checkpoint = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    return OpenCLIPConditioner(ours.components), reference_sd2_text_encoder(checkpoint)


def _final_norm(model):
    return getattr(model, "text_model", model).final_layer_norm


def test_conditioner_matches_transformers_through_the_single_file_converter(encoders):
    ours, ref = encoders
    tokenizer = reference_sd2_tokenizer()
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, -1] == 0  # "!" padding, as the SD2.x tokenizer config has it
    chunks = build_chunks(ours.tokenizer, PROMPT)
    assert [list(c.tokens) for c in chunks] == ids.tolist()
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
    got = ours.encode(PROMPT, EncoderSettings()).context
    assert got.shape == (1, 77, 64)
    assert rel_err(got, expected) <= 1e-5
    # clip skip: 1 and 2 are SD2.x's own penultimate layer; 3 the layer before it, still after ln_final
    assert torch.equal(ours.encode(PROMPT, EncoderSettings(clip_skip=2)).context, got)
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states  # embeddings, block 1, block 2 (of 3)
        skip3 = _final_norm(ref)(hidden[1])
    assert rel_err(ours.encode(PROMPT, EncoderSettings(clip_skip=3)).context, skip3) <= 1e-5
    with pytest.raises(RequestError, match="clip_skip.*at most 3"):
        ours.encode(PROMPT, EncoderSettings(clip_skip=4))


def test_weighted_long_prompt_is_chunked_and_emphasised_as_a1111(encoders):
    ours, ref = encoders
    prompt = "(masterpiece:1.3), " + ", ".join(f"[detail {i}]" for i in range(40))
    chunks = build_chunks(ours.tokenizer, prompt)
    assert len(chunks) >= 2 and chunks[-1].tokens[-1] == 0  # padded with "!" after EOS
    ids = torch.tensor([c.tokens for c in chunks])
    weights = torch.tensor([c.weights for c in chunks])
    with torch.no_grad():
        expected = apply_emphasis(ref(ids).last_hidden_state, weights).reshape(1, -1, 64)
    got = ours.encode(prompt, EncoderSettings()).context
    assert got.shape == (1, 77 * len(chunks), 64) and rel_err(got, expected) <= 1e-5


def test_v_prediction_guess_from_tensor_data_and_header(models_dir):
    for prediction in ("eps", "v"):
        path = _file(models_dir, prediction)
        for info in (inspect_checkpoint(path), inspect_header(path)):  # loader (torch) and UI thread (stdlib)
            assert (info.family, info.prediction) == ("sd2", prediction)
            assert any("> 0.09" in note for note in info.notes)
    spec = get_family("sd2")
    assert spec.default_size_for("v") == (768, 768) and spec.default_size_for("eps") == (512, 512)
    assert spec.default_size_for(None) == (768, 768)
    assert get_family("sd15").default_size_for("v") == (512, 512)


def test_full_size_layout_is_the_real_sd2_file():
    """The full-size random file has SD2.1's key names and shapes (checked on the meta-device layout)."""
    shapes = {}
    for role, prefix in get_family("sd2").prefixes.items():
        component = get_family("sd2").component(role)
        with torch.device("meta"):
            module = component.network_class()(component.config_class()(**component.presets["full"]))
        shapes.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})
    te = "cond_stage_model.model."
    assert shapes[te + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert te + "transformer.resblocks.24.ln_1.weight" not in shapes
    assert shapes[te + "text_projection"] == (1024, 1024) and shapes[te + "positional_embedding"] == (77, 1024)
    u = "model.diffusion_model."
    assert shapes[u + "output_blocks.11.1.transformer_blocks.0.norm1.bias"] == (320,)
    assert shapes[u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes[u + "input_blocks.1.1.proj_in.weight"] == (320, 320)  # Linear, not SD1.x's 1x1 conv
    tiny = dict(iter_random_checkpoint("sd2", "tiny", prediction="eps", dtype=torch.float32))
    assert float(tiny[te + "logit_scale"]) == pytest.approx(4.6052)  # real files keep it; the loader skips it


def test_prediction_override_reaches_the_denoiser_and_is_validated(models_dir):
    model = load_model(_file(models_dir, "v"), compute_hash=False)
    assert model.prediction == "v" and type(model.denoiser()).__name__ == "VDenoiser"
    assert type(model.denoiser("eps")).__name__ == "EpsDenoiser"
    req = GenerationRequest(model="sd2-v", prompt=PROMPT, steps=2, seed=1, width=64, height=64)
    auto = generate(model, req)[0][0]
    assert psnr(generate(model, req.replace(prediction="v"))[0][0], auto) == float("inf")
    assert psnr(generate(model, req.replace(prediction="eps"))[0][0], auto) < 30
    with pytest.raises(RequestError, match="prediction.*one of auto, eps, v"):
        GenerationRequest(model="m", prediction="flow")
    text = format_infotext(req.replace(prediction="eps"), 1)
    assert "Prediction: eps" in text and "Prediction" not in format_infotext(req, 1)
    assert parse_infotext(text)["Prediction"] == "eps"
    assert infotext_to_request(text, model_fallback="m").prediction == "eps"


def test_prediction_override_is_refused_for_flow_families():
    from core.models.family import FlowSampling
    from core.pipeline import LoadedModel

    class Flow:  # only what prediction_for reads
        spec = get_family("flux")
        prediction = "flow"

    assert isinstance(Flow.spec.sampling, FlowSampling)
    assert LoadedModel.prediction_for(Flow, "auto") == "flow"
    with pytest.raises(RequestError, match="prediction.*auto \\(Flux.1 models are flow-matching\\)"):
        LoadedModel.prediction_for(Flow, "v")


def test_batch_cli_matches_diffusers_for_eps_and_v_files(models_dir, tmp_path):
    """``darkroom --batch`` in a subprocess against ``StableDiffusionPipeline`` over the same file with Euler
    and the matching ``prediction_type`` (10 steps: see test_pipeline's SD1.5 parity test), and the v file run
    with the eps override against the epsilon pipeline."""
    base = GenerationRequest(model="sd2-eps", prompt=PROMPT, negative_prompt=NEGATIVE, sampler="euler",
                             schedule="normal", steps=10, cfg=7.0, seed=42, width=64, height=96)
    jobs = [base, base.replace(model="sd2-v", seed=43), base.replace(model="sd2-v", seed=43, prediction="eps")]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(r.to_dict()) for r in jobs))
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "--batch", str(jobs_file), "--models-dir", str(models_dir),
         "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert len(paths) == 3 and all(p.is_file() for p in paths), done.stdout

    def reference(file: str, prediction: str, req: GenerationRequest) -> Image.Image:
        pipe = reference_sd2_pipeline(_file(models_dir, file), prediction)
        return pipe(prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
                    guidance_scale=req.cfg, generator=torch.Generator().manual_seed(req.seed),
                    width=req.width, height=req.height).images[0]

    ours = [Image.open(p).convert("RGB") for p in paths]
    eps_ref, v_ref, v_as_eps_ref = reference("eps", "eps", jobs[0]), reference("v", "v", jobs[1]), reference(
        "v", "eps", jobs[2])
    scores = [psnr(ours[0], eps_ref), psnr(ours[1], v_ref), psnr(ours[2], v_as_eps_ref)]
    print("SD2 batch vs diffusers PSNR (eps, v, v-as-eps):", scores)
    assert min(scores) >= 40
    assert psnr(ours[1], v_as_eps_ref) < 30  # the prediction type really changes the image
    assert json.loads(Image.open(paths[2]).text["darkroom"])["prediction"] == "eps"


def test_header_float_reader_matches_torch_and_refuses_what_it_cannot_read(tmp_path):
    from core.errors import CheckpointError
    from core.models.safetensors_header import read_floats, read_header
    from core.models.safetensors_writer import save_tensors

    values = torch.randn(320, generator=torch.Generator().manual_seed(0)) * 0.1
    tensors = {d: values.to(getattr(torch, d)) for d in ("float16", "bfloat16", "float32", "float64")}
    tensors["ids"] = torch.arange(4)
    tensors["big"] = torch.zeros(300_000)
    header = read_header(save_tensors(tensors, tmp_path / "t.safetensors"))
    for name in ("float16", "bfloat16", "float32", "float64"):
        assert read_floats(header, name) == tensors[name].double().tolist(), name
    with pytest.raises(CheckpointError, match="not a float tensor"):
        read_floats(header, "ids")
    with pytest.raises(CheckpointError, match="too large"):
        read_floats(header, "big")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: header.tensors["float32"].start + 10])  # truncated since
    with pytest.raises(CheckpointError, match="truncated"):
        read_floats(header, "float32")


def test_header_inspection_of_sd2_reads_its_bias_without_torch(models_dir):
    """The UI thread's guess (inspect_header) reads the bias with the stdlib: torch stays unimported."""
    code = (
        "import sys; from core.models.detect import inspect_header; "
        f"i = inspect_header({str(_file(models_dir, 'eps'))!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(i.family, i.prediction)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sd2", "eps"]
