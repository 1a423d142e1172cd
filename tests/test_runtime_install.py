"""A user's install has the runtime dependencies only: no diffusers or transformers (the test extra brings
them here), and numpy only as the `gguf` package's own dependency, which nothing but GGUF files reach. These
tests run the real SD pipeline with numpy/diffusers/transformers made unimportable, so a use of numpy on that path
(``Tensor.numpy()``, ``Image.fromarray``, ``safetensors.torch.save_file``) fails here and not only on a user's
machine. ``scripts/check_runtime_install.sh`` (run by ``.ci/run``) installs the runtime dependencies alone in a
fresh venv and generates an image."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image

from core.tensor_bytes import rgb_image, tensor_bytes

REPO = Path(__file__).resolve().parents[1]

_BLOCK_TEST_ONLY = """
    import sys
    # Every finder answers "not installed" for the test-only packages, as on a user's machine.
    class _Hide:
        def __init__(self, finder):
            self.finder = finder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("numpy", "diffusers", "transformers"):
                return None
            return self.finder.find_spec(name, path, target)
        def __getattr__(self, attr):
            return getattr(self.finder, attr)
    sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
"""


def test_batch_generates_without_numpy(tmp_path):
    code = _BLOCK_TEST_ONLY + """
    from core.models.testing import write_random_checkpoint
    write_random_checkpoint(sys.argv[1] + "/models/tiny.safetensors", "sd15", "tiny")
    from cli.main import main
    sys.exit(main(["--batch", sys.argv[1] + "/jobs.toml", "--models-dir", sys.argv[1] + "/models",
                   "--output-dir", sys.argv[1] + "/out", "--db", sys.argv[1] + "/db"]))
    """
    (tmp_path / "jobs.toml").write_text(
        '[[job]]\nmodel = "tiny"\nprompt = "a lighthouse"\nseed = 7\nsteps = 2\nwidth = 64\nheight = 64\n'
        'hires = { scale = 1.5, upscaler = "image", denoise = 0.5, steps = 1 }\n'
    )
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "NumPy" not in proc.stderr, proc.stderr
    (path,) = proc.stdout.split()
    with Image.open(path) as image:
        image.load()
        assert image.size == (96, 96)
        assert "Seed: 7" in image.info["parameters"]


def test_rgb_image_keeps_pixel_order():
    pixels = torch.arange(2 * 3 * 3, dtype=torch.uint8).view(2, 3, 3)
    image = rgb_image(pixels)
    assert image.size == (3, 2)
    assert image.getpixel((1, 0)) == (3, 4, 5) and image.getpixel((2, 1)) == (15, 16, 17)
    # a non-contiguous view (channels-first permuted) gives the same picture
    chw = pixels.permute(2, 0, 1).contiguous()
    assert rgb_image(chw.permute(1, 2, 0)).tobytes() == image.tobytes()


def test_tensor_bytes_match_the_tensor(tmp_path):
    t = torch.tensor([1.0, -2.5], dtype=torch.float16)
    assert bytes(tensor_bytes(t)) == bytes.fromhex("003c00c1")
    assert bytes(tensor_bytes(torch.zeros(0))) == b""


def test_written_safetensors_read_back_by_the_reference_library(tmp_path):
    from safetensors import safe_open

    from core.models.safetensors_header import read_header
    from core.models.safetensors_writer import save_tensors

    tensors = {
        "a.weight": torch.randn(3, 5, dtype=torch.float32),
        "b.bias": torch.randn(7).to(torch.bfloat16),
        "ids": torch.arange(4, dtype=torch.int64)[None],
        "c": torch.randn(2, 2).t(),  # not contiguous
        "fp8": torch.randn(3).to(torch.float8_e4m3fn),
    }
    path = save_tensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"} and set(header.tensors) == set(tensors)
    assert header.data_start % 8 == 0
    with safe_open(str(path), framework="pt") as f:
        for key, tensor in tensors.items():
            assert torch.equal(f.get_tensor(key).view(torch.uint8), tensor.contiguous().view(torch.uint8)), key
    assert not list(tmp_path.glob(".*tmp"))
