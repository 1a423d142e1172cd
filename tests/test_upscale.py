"""Model upscalers (core/upscale.py): random-weight ESRGAN-family files in the layouts spandrel detects, loaded
without pickle code, run tiled against spandrel's own untiled model call.

spandrel needs torchvision at import; where no real one imports, tests/spandrel_env.py puts a stand-in on the
path (its docstring says why and what it holds).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.models.registry import ModelRegistry
from core.models.testing import write_random_esrgan
from core.upscale import (
    UpscalerError,
    UpscalerUnavailableError,
    choose_tile,
    import_spandrel,
    load_upscaler,
    run_tiled,
    tile_boxes,
    upscale_image,
    upscale_tensor,
)
from tests.reference import torch_threads
from tests.spandrel_env import spandrel_imported

# (folder, file, layout, scale, options): old-arch ESRGAN (4x-UltraSharp's layout) in ComfyUI's folder, a 2x one
# as a .pth in A1111's, Real-ESRGAN x4plus (basicsr names under params_ema) and x2plus (pixel-unshuffle)
FILES = (
    ("upscale_models", "4x-Tiny.safetensors", "esrgan", 4, {}),
    ("ESRGAN", "2x-Tiny.pth", "esrgan", 2, {}),
    ("RealESRGAN", "RealESRGAN_x4plus_tiny.pth", "realesrgan", 4, {}),
    ("upscale_models", "RealESRGAN_x2plus_tiny.safetensors", "realesrgan", 4, {"unshuffle": True}),
)
SCALES = {"4x-Tiny": 4, "2x-Tiny": 2, "RealESRGAN_x4plus_tiny": 4, "RealESRGAN_x2plus_tiny": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def spandrel():
    with spandrel_imported() as module:
        yield module


@pytest.fixture(scope="module")
def models(tmp_path_factory, spandrel) -> Path:
    root = tmp_path_factory.mktemp("models")
    for folder, name, layout, scale, options in FILES:
        write_random_esrgan(root / folder / name, layout, scale, filters=8, seed=len(name), **options)
    return root


@pytest.fixture(scope="module")
def registry(models) -> ModelRegistry:
    return ModelRegistry([models])


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand((1, 3, 80, 64), generator=torch.Generator().manual_seed(1))


def test_registry_finds_upscalers_in_comfyui_and_a1111_folders(registry, models):
    assert [m.name for m in registry.upscalers()] == sorted(SCALES, key=str.lower)
    assert registry.find_upscaler("4x-tiny") == models / "upscale_models" / "4x-Tiny.safetensors"
    with pytest.raises(Exception, match="close matches: 4x-Tiny"):
        registry.find_upscaler("4x-Tinny")
    assert registry.checkpoints() == []  # an upscaler is never listed as a checkpoint


def test_a1111_upscaler_names_find_their_files(tmp_path):
    """An A1111 image's ``Hires upscaler: R-ESRGAN 4x+`` is its RealESRGAN_x4plus.pth; without the file, the
    message says which file to put where."""
    from core.errors import ModelNotFoundError

    folder = tmp_path / "models" / "ESRGAN"
    folder.mkdir(parents=True)
    (folder / "RealESRGAN_x4plus.pth").write_bytes(b"")
    registry = ModelRegistry([tmp_path / "models"])
    assert registry.find_upscaler("R-ESRGAN 4x+") == folder / "RealESRGAN_x4plus.pth"
    with pytest.raises(ModelNotFoundError, match=r"A1111's name for RealESRGAN_x2plus\.pth: put that file in"):
        registry.find_upscaler("R-ESRGAN 2x+")


@pytest.mark.parametrize("name", sorted(SCALES))
def test_each_layout_loads_as_spandrel_loads_it(registry, spandrel, image, name):
    """Our weights-only reading + load_from_state_dict gives spandrel's own model (its file loader) exactly."""
    path = registry.find_upscaler(name)
    ours = load_upscaler(path)
    theirs = spandrel.ModelLoader().load_from_file(path)
    assert (ours.scale, ours.descriptor.architecture.name) == (SCALES[name], "ESRGAN")
    assert ours.dtype == torch.float32  # always on the CPU
    small = image[:, :, :32, :24]
    torch.testing.assert_close(ours(small), theirs(small), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["4x-Tiny", "RealESRGAN_x2plus_tiny"])
def test_tiled_equals_untiled_away_from_seams_and_nearly_at_them(registry, image, name):
    """Tiles of 48 with 24 overlapping: where one tile covers a pixel it is spandrel's untiled result to float
    rounding; in the shared bands (feathered over their middle) the difference stays small."""
    upscaler = load_upscaler(registry.find_upscaler(name))
    untiled = upscaler.descriptor(image)
    tiled = run_tiled(upscaler, image, upscaler.scale, 48, 24)
    assert tiled.shape == untiled.shape == (1, 3, 80 * upscaler.scale, 64 * upscaler.scale)
    assert float(untiled.std()) > 0.05  # an image, not a constant the clamp made
    cover = torch.zeros(80, 64)
    for x, y, w, h in tile_boxes(64, 80, 48, 24):
        cover[y:y + h, x:x + w] += 1
    assert len(tile_boxes(64, 80, 48, 24)) == 6 and (cover == 1).any()
    cover = cover.repeat_interleave(upscaler.scale, 0).repeat_interleave(upscaler.scale, 1)
    diff = (tiled - untiled).abs()[0].amax(0)
    assert float(diff[cover == 1].max()) < 2e-5
    assert float(diff[cover > 1].max()) < 1e-2 and float(diff[cover > 1].mean()) < 1e-3
    # and without the feathering margin's effect: a cut with no overlap at all shows its seam
    hard = run_tiled(upscaler, image, upscaler.scale, 40, 0)
    assert float((hard - untiled).abs().max()) > 10 * float(diff.max())


def test_a_2x_model_runs_twice_for_4x_then_resizes(registry):
    upscaler = load_upscaler(registry.find_upscaler("2x-Tiny"))
    source = Image.effect_mandelbrot((40, 24), (-2, -1.2, 1, 1.2), 30).convert("RGB")
    before = upscaler.tiles_run
    out = upscale_image(upscaler, source, 150, 90)
    assert out.size == (150, 90) and upscaler.tiles_run - before == 2  # 40x24 -> 80x48 -> 160x96 -> Lanczos


def test_tile_size_from_setting_or_memory_probe(registry, monkeypatch):
    upscaler = load_upscaler(registry.find_upscaler("4x-Tiny"))
    monkeypatch.setenv("DARKROOM_UPSCALE_TILE", "96")
    assert choose_tile(upscaler) == 96
    monkeypatch.setenv("DARKROOM_UPSCALE_TILE", "big")
    with pytest.raises(UpscalerError, match="DARKROOM_UPSCALE_TILE"):
        choose_tile(upscaler)
    monkeypatch.delenv("DARKROOM_UPSCALE_TILE")
    roomy = choose_tile(upscaler, free=64 << 30)
    upscaler.tile = None
    tight = choose_tile(upscaler, free=256 << 20)
    assert 64 <= tight < roomy <= 1024 and tight % 32 == 0


def test_out_of_memory_halves_the_tile(registry, image):
    upscaler = load_upscaler(registry.find_upscaler("4x-Tiny"))
    real = upscaler.descriptor
    sizes = []

    class Tight:
        scale, architecture = real.scale, real.architecture

        def __call__(self, tile):
            sizes.append(tile.shape[-2])
            if tile.shape[-2] > 64:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(tile)

    upscaler.descriptor = Tight()
    out = upscale_tensor(upscaler, image, tile=128)
    assert out.shape[-2:] == (320, 256) and upscaler.tile == 64 and sizes[:2] == [80, 64]


def test_pickle_code_in_a_pth_is_never_run(tmp_path, spandrel):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"model.0.weight": Payload()}, handle, protocol=2)
    with pytest.raises(UpscalerError, match=r"evil\.pth: holds pickled objects other than weights"):
        load_upscaler(path)
    assert not marker.exists()


def test_unsupported_and_broken_files_are_one_message_naming_the_file(tmp_path, spandrel):
    from core.models.safetensors_writer import save_tensors

    other = save_tensors({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(UpscalerError, match=r"vae\.safetensors: not an upscaler architecture spandrel"):
        load_upscaler(other)
    broken = tmp_path / "cut.safetensors"
    write_random_esrgan(broken, filters=8)
    broken.write_bytes(broken.read_bytes()[:-100])
    with pytest.raises(UpscalerError, match=r"cut\.safetensors: cannot be read as an upscaler"):
        load_upscaler(broken)


def test_missing_spandrel_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # as if it were not installed
    with pytest.raises(UpscalerUnavailableError, match=r"pip install 'darkroom\[upscale\]'"):
        import_spandrel()


def test_list_models_lists_the_upscalers_and_what_they_need(models, tmp_path, monkeypatch):
    import importlib.util
    import io

    from cli.list_models import list_models
    from core.models.testing import write_random_checkpoint

    write_random_checkpoint(tmp_path / "checkpoints" / "tiny.safetensors", "sd15", "tiny")
    out = io.StringIO()
    assert list_models([tmp_path, models], out, io.StringIO()) == 0
    table = out.getvalue().split("\n\nupscaler")[1].splitlines()
    assert table[0].split() == ["format", "size", "note"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["2x-Tiny"][1] == "pth" and rows["4x-Tiny"][1] == "safetensors" and len(rows) == 4
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "spandrel" else real(name, *a))
    out = io.StringIO()
    list_models([tmp_path, models], out, io.StringIO())
    assert "needs spandrel: pip install 'darkroom[upscale]'" in out.getvalue().split("\n\nupscaler")[1]


def test_precision_follows_what_the_architecture_supports():
    from types import SimpleNamespace

    from core.upscale import _dtype_for

    both = SimpleNamespace(supports_half=True, supports_bfloat16=True)
    half_only = SimpleNamespace(supports_half=True, supports_bfloat16=False)
    neither = SimpleNamespace(supports_half=False, supports_bfloat16=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _dtype_for(both, cuda, torch.bfloat16) == torch.bfloat16
    assert _dtype_for(half_only, cuda, torch.bfloat16) == torch.float16  # bf16 refused: half still saves memory
    assert _dtype_for(half_only, cuda, torch.float16) == torch.float16
    assert _dtype_for(neither, cuda, torch.float16) == torch.float32
    assert _dtype_for(both, cpu, torch.bfloat16) == torch.float32  # the CPU runs float32


@pytest.mark.parametrize(("width", "height", "tile", "overlap"),
                         [(64, 80, 48, 24), (65, 33, 32, 8), (100, 7, 16, 15), (40, 40, 64, 16), (97, 61, 20, 6)])
def test_the_blend_weights_sum_to_one_for_any_grid(width, height, tile, overlap):
    """A pointwise 'upscaler' (nearest 2x, no receptive field) comes out of any tiling exactly as it went in."""
    def nearest(t):
        return t.repeat_interleave(2, -1).repeat_interleave(2, -2)

    image = torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(width))
    torch.testing.assert_close(run_tiled(nearest, image, 2, tile, overlap), nearest(image), rtol=0, atol=2e-6)
