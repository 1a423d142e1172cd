"""The family registry: every family module provides what the contract needs, the registry finds modules by
itself, and the family (not a default) decides scales, prediction types and the noise form."""

from __future__ import annotations

import importlib.resources
import sys
import textwrap
import tomllib

import pytest
import torch

from core.errors import DarkroomError, RequestError
from core.models import families
from core.models.checkpoint import inspect_checkpoint, load_vae
from core.models.family import ROLE_LABELS, SIZES, DiscreteSampling, FlowSampling, ModelFamily, resolve
from core.models.testing import write_random_checkpoint

ALL = list(families.FAMILIES.values())
RUNNABLE = families.runnable()


def _ids(fams: list[ModelFamily]) -> list[str]:
    return [f.name for f in fams]


def test_registry_lists_every_known_family_in_order():
    assert list(families.FAMILIES) == ["sd15", "sd2", "sdxl", "sdxl_refiner", "flux", "flux2", "sd3", "zimage"]
    assert _ids(RUNNABLE) == ["sd15", "sd2", "sdxl", "sdxl_refiner", "flux", "flux2", "zimage"]
    with pytest.raises(RequestError, match="sd15, sd2"):
        families.get_family("sd9")


@pytest.mark.parametrize("family", ALL, ids=_ids(ALL))
def test_every_family_module_fills_the_contract(family):
    assert family.name and family.label and callable(family.detect)
    roles = [c.role for c in family.components]
    assert roles[0] == "unet" and set(roles) <= set(ROLE_LABELS)
    assert all(c.prefix is not None for c in family.components)
    w, h = family.default_size
    assert w % family.pixel_multiple == 0 and h % family.pixel_multiple == 0
    if family.latent is not None:
        fmt = family.latent
        assert fmt.family == family.name and fmt.channels == len(fmt.rgb_factors) and len(fmt.rgb_bias) == 3
        # 8x VAEs; FLUX.2's model space is its 8x latent patchified 2x2 (4x the channels, 16x down)
        assert fmt.scale > 0 and fmt.downscale == 8 * round((fmt.channels // fmt.raw_channels) ** 0.5)
    if family.ays_levels is not None:
        levels = family.ays_levels
        assert len(levels) == 11 and all(a > b for a, b in zip(levels, levels[1:]))
    assert family.sampling.prediction in ("eps", "v", "flow")
    # Every component that names classes builds from its presets, and the VAE's presets agree with the
    # family's latent format (the one place the scale is written).
    for c in family.components:
        if not c.loadable:
            continue
        for size in SIZES:
            config = c.config_class()(**c.presets[size])
            if c.role == "vae":
                assert (config.z_channels, getattr(config, "scaling_factor", 1.0),
                        getattr(config, "shift_factor", 0.0)) == (
                    family.latent.raw_channels, family.latent.scale, family.latent.shift
                )


@pytest.mark.parametrize("family", RUNNABLE, ids=_ids(RUNNABLE))
def test_runnable_families_have_everything_to_generate(family, tmp_path):
    assert family.latent is not None and family.conditioner
    assert callable(resolve(family.conditioner))
    assert family.sampling.schedule() is not None or isinstance(family.sampling, FlowSampling)
    # A random checkpoint in the family's layout is detected as that family, with the family's prediction.
    path = write_random_checkpoint(tmp_path / "x.safetensors", family.name, "tiny")
    info = inspect_checkpoint(path)
    assert (info.family, info.prediction) == (family.name, family.sampling.prediction)
    assert info.prefixes == family.prefixes


def test_builtin_presets_belong_to_the_family_that_lists_them():
    shipped = {
        entry.name.removesuffix(".toml"): tomllib.loads(entry.read_text(encoding="utf-8"))
        for entry in importlib.resources.files("presets").iterdir()
        if entry.name.endswith(".toml")
    }
    listed = {name: f.name for f in ALL for name in f.presets}
    assert set(listed) == set(shipped)  # every file is some family's, every listed name is shipped
    for name, family in listed.items():
        assert shipped[name].get("family") == family
        assert families.FAMILIES[family].takes_presets


def test_a_new_family_module_is_registered_without_editing_anything(tmp_path, monkeypatch):
    """Adding a family is adding one module: the registry finds it."""
    (tmp_path / "toy.py").write_text(
        textwrap.dedent(
            """
            from core.models.family import Component, ModelFamily

            FAMILY = ModelFamily(name="toy", label="Toy", order=99, components=(Component("unet", "toy."),),
                                 detect=lambda shapes: None)
            """
        )
    )
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    try:
        found = families._discover()
    finally:
        sys.modules.pop("core.models.families.toy", None)
        vars(families).pop("toy", None)
    assert list(found)[-1] == "toy" and not found["toy"].runnable
    assert list(found)[:-1] == list(families.FAMILIES)


def test_a_family_module_must_be_named_after_its_family(tmp_path, monkeypatch):
    (tmp_path / "wrong.py").write_text(
        "from core.models.family import Component, ModelFamily\n"
        "FAMILY = ModelFamily(name='other', label='O', order=1, components=(Component('unet', ''),),"
        " detect=lambda s: None)\n"
    )
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    try:
        with pytest.raises(ValueError, match="name the module after it"):
            families._discover()
    finally:
        sys.modules.pop("core.models.families.wrong", None)
        vars(families).pop("wrong", None)


def test_vae_loaded_for_a_family_gets_that_familys_scale(tmp_path):
    """The VAE's scale comes from the family it is loaded for, never from SD1.5's default."""
    path = write_random_checkpoint(tmp_path / "sd15.safetensors", "sd15", "tiny")
    assert load_vae(path, family="sd15").config.scaling_factor == 0.18215
    sdxl = load_vae(path, family="sdxl").config  # same shapes as SDXL's VAE: only the family tells
    assert (sdxl.scaling_factor, sdxl.shift_factor) == (0.13025, 0.0)


def test_prediction_names_agree_between_detection_and_sampling():
    """Detection writes eps/v; the family default uses the same names, so no 'epsilon' fallback exists."""
    net = torch.nn.Identity()
    sampling = families.get_family("sd15").sampling
    schedule = sampling.schedule()
    from core.sampling.denoisers import EpsDenoiser, VDenoiser

    assert type(sampling.denoiser(net, schedule, "eps")) is EpsDenoiser
    assert type(sampling.denoiser(net, schedule, "v")) is VDenoiser
    with pytest.raises(DarkroomError, match="edm"):
        sampling.denoiser(net, schedule, "edm")


def test_noise_forms():
    x0, noise = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), -1.0)
    assert torch.equal(DiscreteSampling().noise(x0, noise, 3.0), x0 + 3.0 * noise)
    assert torch.allclose(FlowSampling().noise(x0, noise, 0.25), 0.75 * x0 + 0.25 * noise)


def test_detectors_survive_truncated_shapes():
    """Hostile headers may give any shape; a family's detector reads them without IndexError."""
    from core.models.detect import detect

    u = "model.diffusion_model."
    filler = {f"{u}k{i}": (1,) for i in range(6)}
    assert detect("x", filler | {u + "input_blocks.0.0.weight": ()}, {}).family == "unknown"
    flux = filler | {u + "double_blocks.0.img_attn.norm.key_norm.scale": (1,), u + "img_in.weight": ()}
    assert detect("x", flux, {}).family == "flux"
