"""Load time of a Flux.1 split set (diffusion model, CLIP-L, T5, VAE as separate files) vs a raw read of them.

    .venv/bin/python bench/bench_split_load.py [--width 1024] [--t5-width 2048] [--repeat 3] [--t5-fp8]

Writes a set of random weights in ComfyUI's layout (a transformer ``--width`` wide with 2 double and 4 single
blocks, a 2-layer T5 ``--t5-width`` wide with the real 32128-token vocabulary, the tiny CLIP-L and VAE) to a
temporary folder, then, interleaved ``--repeat`` times with the files in the page cache: a raw read of every
file's bytes (``readinto`` one preallocated buffer), ``load_components`` (build on meta, assign memory-mapped
views), and the same load followed by touching every weight once (what the first step pays). Prints the median
times and the ratios to the raw read. ``--t5-fp8`` stores the T5 in float8_e4m3fn (kept packed).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.models import testing  # noqa: E402
from core.models.checkpoint import load_components, part_prefix  # noqa: E402
from core.models.families import FAMILIES  # noqa: E402
from core.models.flux import Flux, FluxConfig  # noqa: E402
from core.models.quant import module_bytes  # noqa: E402
from core.models.safetensors_writer import save_tensors  # noqa: E402
from core.models.t5 import T5Config, T5EncoderModel  # noqa: E402

NETWORKS = {  # until families/flux.py names them (the flux branch does)
    "unet": ("core.models.flux:FluxConfig", "core.models.flux:Flux"),
    "text_encoder": ("core.models.clip:CLIPTextConfig", "core.models.clip:CLIPTextModel"),
    "text_encoder_2": ("core.models.t5:T5Config", "core.models.t5:T5EncoderModel"),
}


def flux_spec():
    spec = FAMILIES["flux"]
    if all(c.loadable for c in spec.components):
        return spec
    return dataclasses.replace(spec, components=tuple(
        dataclasses.replace(c, config=NETWORKS[c.role][0], network=NETWORKS[c.role][1]) if c.role in NETWORKS else c
        for c in spec.components))


def write_set(folder: Path, width: int, t5_width: int, t5_fp8: bool) -> dict[str, Path]:
    files = testing.write_random_flux_split_set(folder, parts=("clip_l", "vae"))
    heads = width // 128 if width % 128 == 0 else width // 64
    cfg = FluxConfig(hidden_size=width, num_heads=heads, depth=2, depth_single_blocks=4, vec_in_dim=32,
                     context_in_dim=t5_width, axes_dim=testing_axes(width // heads))
    with torch.device("meta"):
        flux = Flux(cfg)
    save_tensors(testing.random_state_dict(flux, dtype=torch.bfloat16), files["model"])
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(d_model=t5_width, d_kv=64, num_heads=t5_width // 64, d_ff=t5_width * 5 // 2,
                                     num_layers=2))
    weights = testing.random_state_dict(t5, dtype=torch.float16)
    if t5_fp8:
        weights = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in weights.items()}
    name = "t5xxl_fp8_e4m3fn" if t5_fp8 else "t5xxl_fp16"
    files["t5xxl"] = save_tensors(weights, files["clip_l"].with_name(f"{name}.safetensors"))
    return files


def testing_axes(head_dim: int) -> tuple[int, int, int]:
    from core.models.flux import rope_axes

    return rope_axes(head_dim)


def raw_read(paths: list[Path]) -> float:
    start = time.perf_counter()
    buffer = bytearray(max(p.stat().st_size for p in paths))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            f.readinto(buffer)
    return time.perf_counter() - start


def load(spec, sources, touch: bool) -> tuple[float, int]:
    start = time.perf_counter()
    modules = load_components(spec, sources, dtype=None)
    if touch:
        for module in modules.values():
            for t in (*module.parameters(), *module.buffers()):
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()  # one read per page
    elapsed = time.perf_counter() - start
    return elapsed, sum(module_bytes(m) for m in modules.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--t5-width", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--t5-fp8", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = flux_spec()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_set(Path(tmp), args.width, args.t5_width, args.t5_fp8)
        roles = {"unet": files["model"], "text_encoder": files["clip_l"], "text_encoder_2": files["t5xxl"],
                 "vae": files["vae"]}
        sources = {role: (path, "" if role == "unet" else part_prefix(path, spec, spec.component(role)))
                   for role, path in roles.items()}
        paths = list(roles.values())
        total = sum(p.stat().st_size for p in paths)
        raw_read(paths)  # into the page cache
        times: dict[str, list[float]] = {"raw read": [], "load": [], "load + touch": []}
        held = 0
        for _ in range(args.repeat):
            times["raw read"].append(raw_read(paths))
            times["load"].append(load(spec, sources, touch=False)[0])
            elapsed, held = load(spec, sources, touch=True)
            times["load + touch"].append(elapsed)
    raw = statistics.median(times["raw read"])
    print(f"split set: {len(paths)} files, {total / 1e6:.1f} MB on disk, {held / 1e6:.1f} MB held after loading"
          f"{' (T5 fp8, packed)' if args.t5_fp8 else ''}; median of {args.repeat}, page cache warm")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<13} {median * 1000:8.1f} ms   ratio to raw read {median / raw:5.2f}")


if __name__ == "__main__":
    main()
