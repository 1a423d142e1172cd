"""TAESD previews: our decoder against diffusers' AutoencoderTiny, the real taef2 file, safe loading, the
2 % throttle (with an injected clock, no timing), the projection fallback and the pipeline wiring."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core.errors import CheckpointError
from core.models.latent_formats import preview_image
from core.models.previews import (
    PreviewDecoders,
    Previewer,
    find_preview_decoder,
    load_preview_decoder,
)
from core.models.taesd import (
    Block,
    DecoderConfig,
    TAESDDecoder,
    TAESDEncoder,
    build_decoder,
    decode_preview,
    decoder_input,
)

REAL_TAEF2 = Path("/work/shared/data/taesd/taef2_decoder.pth")


def random_decoder(channels: int, midblock_gn: bool = False, seed: int = 0) -> TAESDDecoder:
    torch.manual_seed(seed)
    decoder = TAESDDecoder(DecoderConfig(channels, 64, midblock_gn))
    with torch.no_grad():  # default init leaves activations tiny after 20 layers; spread them out
        for p in decoder.parameters():
            p.mul_(1.5)
    return decoder.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("channels", [4, 16, 32])
def test_decoder_equals_diffusers_autoencoder_tiny(channels):
    from diffusers import AutoencoderTiny

    torch.manual_seed(channels)
    ref = AutoencoderTiny(latent_channels=channels).eval()
    with torch.no_grad():
        for p in ref.decoder.parameters():
            p.mul_(1.5)
    # diffusers' names (decoder.layers.N, no Clamp in the Sequential) go in as they are
    ours = build_decoder(ref.state_dict())
    assert ours.config == DecoderConfig(channels, 64, False)
    x = torch.randn(2, channels, 6, 5) * 2
    with torch.no_grad():
        want = ref.decode(x).sample  # [-1, 1]
        got = ours(x) * 2 - 1
    assert got.shape == (2, 3, 48, 40)
    assert rel_err(got, want) <= 1e-5
    assert want.std() > 0.05  # the comparison is not between two near-zero images


def test_our_key_layout_loads_into_diffusers_and_matches():
    """The other way round: random weights in the published layout (``1.weight`` ... ``19.bias``)."""
    from diffusers import AutoencoderTiny

    ours = random_decoder(4, seed=3)
    state = ours.state_dict()
    assert "1.weight" in state and "3.conv.4.bias" in state and "7.weight" in state and "19.bias" in state
    assert "7.bias" not in state  # the upsample convs have no bias, as in the files
    assert sum(p.numel() for p in ours.parameters()) == 1_222_531  # TAESD README
    ref = AutoencoderTiny(latent_channels=4).eval()
    ref.decoder.load_state_dict({f"layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v
                                 for k, v in state.items()})
    x = torch.randn(1, 4, 8, 8) * 2
    with torch.no_grad():
        assert rel_err(ours(x) * 2 - 1, ref.decode(x).sample) <= 1e-5


def test_encoder_equals_diffusers_encoder_tiny():
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    ref = AutoencoderTiny(latent_channels=4).eval()
    enc = TAESDEncoder(DecoderConfig(4))
    enc.load_state_dict({k.removeprefix("encoder.layers."): v for k, v in ref.state_dict().items()
                         if k.startswith("encoder.layers.")})
    image = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        assert rel_err(enc(image), ref.encode(image * 2 - 1).latents) <= 1e-5


def test_taef2_midblock_branch_is_conv_groupnorm_relu_conv_added_before_the_block():
    torch.manual_seed(0)
    block = Block(64, 64, midblock_gn=True).eval()
    with torch.no_grad():
        block.pool[1].weight.normal_()
        block.pool[1].bias.normal_()
    x = torch.randn(1, 64, 9, 7)
    p = block.pool
    h = F.conv2d(x, p[0].weight)
    h = F.group_norm(h, 4, p[1].weight, p[1].bias, eps=1e-5).relu()
    y = x + F.conv2d(h, p[3].weight)
    c = block.conv
    inner = F.conv2d(F.conv2d(F.conv2d(y, c[0].weight, c[0].bias, padding=1).relu(), c[2].weight, c[2].bias,
                              padding=1).relu(), c[4].weight, c[4].bias, padding=1)
    with torch.no_grad():
        assert torch.allclose(block(x), (inner + y).relu(), atol=1e-5)


def test_taef2_layout_without_the_branch_equals_diffusers():
    """taef2's decoder is TAESD's plus the mid-block branch: with the branch's output conv at zero it must
    be exactly diffusers' 32-channel decoder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(2)
    ref = AutoencoderTiny(latent_channels=32).eval()
    ours = random_decoder(32, midblock_gn=True)
    state = ours.state_dict()
    plain = build_decoder(ref.state_dict()).state_dict()
    for key in plain:
        state[key] = plain[key]
    for i in (3, 4, 5):
        state[f"{i}.pool.3.weight"] = torch.zeros_like(state[f"{i}.pool.3.weight"])
    taef2 = build_decoder(state)
    assert taef2.config.midblock_gn
    x = torch.randn(1, 32, 4, 6)
    with torch.no_grad():
        assert rel_err(taef2(x) * 2 - 1, ref.decode(x).sample) <= 1e-5


def test_flux2_latents_are_unpatchified_before_taef2():
    z = torch.randn(1, 32, 8, 6)  # what taef2 reads
    packed = z.view(1, 32, 4, 2, 3, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 128, 4, 3)  # FLUX.2 model space
    assert torch.equal(decoder_input(packed, "flux2"), z)
    assert torch.equal(decoder_input(z, "flux2"), z)  # already unpacked


# ------------------------------------------------------------------------------------------ real file


def vae_approx(tmp_path: Path, name: str, source: Path | None = None) -> Path:
    folder = tmp_path / "models" / "vae_approx"
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copy(source, folder / name)
    return folder / name


@pytest.mark.skipif(not REAL_TAEF2.is_file(), reason=f"the real taef2 decoder is not at {REAL_TAEF2} "
                    "(madebyollin/taesd taef2_decoder.pth, MIT)")
def test_real_taef2_file_loads_and_decodes(tmp_path):
    raw = torch.load(REAL_TAEF2, map_location="cpu", weights_only=True)
    path = vae_approx(tmp_path, "taef2_decoder.pth", REAL_TAEF2)
    assert find_preview_decoder([tmp_path], "flux2") == path
    assert find_preview_decoder([tmp_path], "flux") is None
    decoder = load_preview_decoder(path, "flux2")
    assert decoder.config == DecoderConfig(32, 64, True)
    assert set(decoder.state_dict()) == set(raw)  # our module's keys are the file's keys
    torch.manual_seed(0)
    x0 = torch.randn(1, 128, 4, 6)  # FLUX.2 model space for a 96x64 image
    image = decode_preview(decoder, x0, "flux2")
    assert image.size == (96, 64) and image.mode == "RGB"
    assert len(set(image.getdata())) > 100  # a picture, not a flat colour
    with pytest.raises(CheckpointError, match="32-channel latents, but sd15 needs 4"):
        load_preview_decoder(path, "sd15")


# ------------------------------------------------------------------------------------------ files


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def test_finding_decoders_by_family_and_comfyui_names(tmp_path):
    assert find_preview_decoder([tmp_path], "sd15") is None
    folder = vae_approx(tmp_path, "x").parent
    for name in ("taesdxl_decoder.pth", "taesd_decoder.pth", "taesd_decoder.safetensors", "taef1_decoder_v2.pth",
                 ".taef2_decoder.pth", "taesd_encoder.pth"):
        (folder / name).write_bytes(b"x")
    assert find_preview_decoder([tmp_path], "sd15") == folder / "taesd_decoder.safetensors"  # beats .pth
    assert find_preview_decoder([tmp_path], "sd2") == folder / "taesd_decoder.safetensors"
    assert find_preview_decoder([tmp_path], "sdxl") == folder / "taesdxl_decoder.pth"
    assert find_preview_decoder([tmp_path], "flux") == folder / "taef1_decoder_v2.pth"  # prefix, as ComfyUI
    assert find_preview_decoder([tmp_path], "flux2") is None  # hidden files are ignored
    assert find_preview_decoder([tmp_path], "sd3") is None
    # A1111/Forge's folder, and a root that is the models folder itself
    a1111 = tmp_path / "webui" / "models" / "VAE-taesd"
    a1111.mkdir(parents=True)
    (a1111 / "taef2_decoder.pth").write_bytes(b"x")
    assert find_preview_decoder([tmp_path / "webui"], "flux2") == a1111 / "taef2_decoder.pth"
    assert find_preview_decoder([tmp_path / "models"], "sdxl") == folder / "taesdxl_decoder.pth"


def test_safetensors_in_diffusers_layout_loads(tmp_path):
    from diffusers import AutoencoderTiny

    ref = AutoencoderTiny(latent_channels=16).eval()
    path = vae_approx(tmp_path, "taef1_decoder.safetensors")
    save_safetensors(ref.state_dict(), path)
    decoder = load_preview_decoder(find_preview_decoder([tmp_path], "flux"), "flux")
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert rel_err(decoder(x) * 2 - 1, ref.decode(x).sample) <= 1e-5


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import builtins

        return (builtins.open, (str(self.marker), "w"))  # creates the marker file if it ever runs


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = vae_approx(tmp_path, "taesd_decoder.pth")
    state = dict(random_decoder(4).state_dict())
    state["payload"] = Evil(marker)
    torch.save(state, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickled Python code") as info:
        load_preview_decoder(path, "sd15")
    assert str(path) in str(info.value)
    assert not marker.exists()
    # through the cache the pipeline uses: the projection takes over and the problem is kept
    decoders = PreviewDecoders([tmp_path])
    assert decoders.get("sd15") is None
    assert "pickled Python code" in decoders.problems[str(path)]
    assert decoders.previewer("sd15").kind == "projection"
    assert not marker.exists()


def test_not_a_taesd_file_is_a_clear_error(tmp_path):
    path = vae_approx(tmp_path, "taesd_decoder.safetensors")
    save_safetensors({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="not a TAESD preview decoder"):
        load_preview_decoder(path)
    state = random_decoder(4).state_dict()
    del state["18.conv.2.bias"]
    save_safetensors(state, path)
    with pytest.raises(CheckpointError, match="missing 18.conv.2.bias"):
        load_preview_decoder(path)


# ------------------------------------------------------------------------------------------ throttle


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def slow_decoder(clock: FakeClock, seconds: float) -> TAESDDecoder:
    class Slow(TAESDDecoder):
        def forward(self, x):
            clock.advance(seconds)  # every decode costs `seconds` of the job's wall time
            return super().forward(x)

    decoder = Slow(DecoderConfig(4))
    decoder.load_state_dict(random_decoder(4).state_dict())
    return decoder.eval()


def run_job(previewer: Previewer, clock: FakeClock, steps: int, step_time: float):
    x0 = torch.randn(1, 4, 4, 4)
    shown = []
    for step in range(steps):
        clock.advance(step_time)
        image = previewer.maybe_preview(x0)
        if image is not None:
            shown.append((step, image.size))
    return shown


def test_throttle_keeps_a_slow_preview_under_two_percent_of_fast_steps():
    clock = FakeClock()
    previewer = Previewer("sd15", slow_decoder(clock, 0.5), clock=clock)  # a preview = 5 steps of 0.1 s
    shown = run_job(previewer, clock, steps=1500, step_time=0.1)
    taesd = [s for s in shown if s[1] == (32, 32)]
    assert previewer.spent <= 0.02 * previewer.elapsed
    assert len(taesd) >= 4  # it still previews, about every 250 steps
    assert previewer.spent > 0.015 * previewer.elapsed  # and uses the budget rather than giving up
    # the first step shows the projection at once (latent size); it stands in until a readable preview fits
    # the budget, then no more
    assert shown[0] == (0, (4, 4))
    first_taesd = shown.index(taesd[0])
    assert all(size == (4, 4) for _, size in shown[:first_taesd])
    assert all(size == (32, 32) for _, size in shown[first_taesd:])


def test_throttle_caps_the_rate_when_previews_are_cheap():
    clock = FakeClock()
    previewer = Previewer("sd15", slow_decoder(clock, 0.0), clock=clock)
    shown = run_job(previewer, clock, steps=100, step_time=0.01)  # 1 s of 10 ms steps
    assert 3 <= len(shown) <= 5  # at most one per 0.25 s
    assert previewer.skipped == 100 - len(shown)


def test_budget_counts_from_start():
    clock = FakeClock()
    previewer = Previewer("sd15", slow_decoder(clock, 0.5), clock=clock)
    run_job(previewer, clock, steps=300, step_time=0.1)
    previewer.start()  # the next job: its own budget, nothing carried over
    assert previewer.spent == 0 and previewer.made == 0
    shown = run_job(previewer, clock, steps=300, step_time=0.1)
    assert shown and shown[0][1] == (4, 4)  # it starts with the projection again
    assert previewer.spent <= 0.02 * previewer.elapsed


def test_projection_when_no_decoder_is_there(tmp_path):
    decoders = PreviewDecoders([tmp_path])
    previewer = decoders.previewer("sdxl")
    assert previewer.decoder is None and previewer.kind == "projection"
    x0 = torch.randn(1, 4, 16, 12)
    image = previewer.maybe_preview(x0)
    assert image.size == (12, 16)
    assert image.tobytes() == preview_image(x0[0], "sdxl").tobytes()
    assert previewer.preview(x0).tobytes() == image.tobytes()


def test_family_without_projection_or_decoder_gives_no_preview(tmp_path):
    previewer = PreviewDecoders([tmp_path]).previewer("sd3")  # recognised, no latent format of its own
    assert previewer.maybe_preview(torch.randn(1, 16, 4, 4)) is None


# ------------------------------------------------------------------------------------------ pipeline


def test_pipeline_runner_previews_with_taesd_from_vae_approx(tmp_path):
    from core.models.testing import write_random_checkpoint
    from core.pipeline import PipelineRunner
    from core.request import GenerationRequest

    write_random_checkpoint(tmp_path / "models" / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    runner = PipelineRunner([tmp_path])
    assert runner.preview_decoders.get("sd15") is None  # projection until a decoder file is there
    save_safetensors(random_decoder(4).state_dict(), vae_approx(tmp_path, "taesd_decoder.safetensors"))
    clock = FakeClock()
    real = runner.preview_decoders.previewer
    runner.preview_decoders.previewer = lambda *a, **k: real(*a, clock=clock, **k)  # free previews, long steps
    steps = []
    ctx = SimpleNamespace(step=lambda step, total, preview=None: (steps.append(preview), clock.advance(60.0)),
                          set_activity=lambda text: None, is_cancelled=lambda: False)
    request = GenerationRequest(prompt="a lighthouse", model="tiny", width=64, height=64, steps=2, seed=1)
    runner.run(SimpleNamespace(request=request), ctx)
    assert len(steps) == 2
    # the projection first (8x8, at once), then TAESD at full size
    assert [p.size for p in steps] == [(8, 8), (64, 64)]


def test_batch_makes_no_previews(tmp_path):
    """Headless runs show no previews, so they must not pay for them (a TAESD decode is a few % of a step)."""
    from cli.batch import pipeline_runner_factory
    from core.models.registry import ModelRegistry

    runner = pipeline_runner_factory(ModelRegistry([tmp_path]), [tmp_path])()
    assert runner.previews is False


def test_a_failing_decoder_falls_back_to_the_projection_without_failing_the_job():
    clock = FakeClock()

    class Broken(TAESDDecoder):
        def forward(self, x):
            clock.advance(0.01)
            raise RuntimeError("CUDA out of memory")

    previewer = Previewer("sd15", Broken(DecoderConfig(4)).eval(), clock=clock)
    shown = run_job(previewer, clock, steps=50, step_time=1.0)
    assert len(shown) == 50 and all(size == (4, 4) for _, size in shown)  # projections throughout
    assert previewer.decoder is None and "CUDA out of memory" in previewer.problem
    assert previewer.spent <= 0.02 * previewer.elapsed


@pytest.mark.parametrize("family,channels", [("sd15", 4), ("sdxl", 4), ("flux", 16)])
def test_taesd_reads_the_model_space_latent_as_it_is(family, channels):
    """TAESD's latent scale is 1 (README): x0 goes in unscaled, not divided back into the raw VAE space."""
    from core.models.taesd import decode_images

    decoder = random_decoder(channels, seed=5)
    x0 = torch.randn(1, channels, 3, 4)
    with torch.no_grad():
        want = (decoder(x0).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(decode_images(decoder, x0, family), want)
