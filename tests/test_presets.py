"""Presets: built-ins, validation with per-file problems, layering, user preset files."""

from __future__ import annotations

import tomllib
from importlib.resources import files

import pytest

from core import presets as P
from core.errors import DarkroomError, PresetError
from core.presets import (
    Preset,
    apply_preset,
    delete_user_preset,
    load_presets,
    rename_user_preset,
    save_user_preset,
)
from core.request import GenerationRequest, HiresFix

SD15_BUILTINS = {"sd15-balanced", "sd15-fast-ays", "sd15-fast-deepcache", "sd15-lcm-4step", "sd15-hires",
                 "sd15-lcm-lora"}
SD2_BUILTINS = {"sd2-balanced", "sd2-base-balanced"}
SDXL_BUILTINS = {"sdxl-balanced", "sdxl-fast-ays", "sdxl-fast-fbcache", "sdxl-hires", "sdxl-lcm-lora",
                 "sdxl-lightning-4step"}
FLUX_BUILTINS = {"flux-dev", "flux-schnell"}
FLUX2_BUILTINS = {"flux2-klein", "flux2-klein-base"}
ZIMAGE_BUILTINS = {"z-image-turbo", "z-image-base"}
BUILTINS = SD15_BUILTINS | SD2_BUILTINS | SDXL_BUILTINS | FLUX_BUILTINS | FLUX2_BUILTINS | ZIMAGE_BUILTINS


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def user_dir(home):
    folder = home / "config" / "presets"
    folder.mkdir(parents=True)
    return folder


def by_name(presets: list[Preset]) -> dict[str, Preset]:
    return {p.name: p for p in presets}


def test_builtins_ship_as_package_data_and_load():
    shipped = sorted(e.name for e in files("presets").iterdir() if e.name.endswith(".toml"))
    assert shipped == sorted(f"{name}.toml" for name in BUILTINS)
    presets, problems = load_presets()
    assert problems == []
    found = by_name(presets)
    assert set(found) == BUILTINS
    # named after the family (Z-Image's as its users write it: z-image-turbo)
    assert all(p.builtin and p.family == p.name.replace("z-image", "zimage").split("-")[0] and p.description
               for p in presets)
    for name, size in (("sd2-balanced", 768), ("sd2-base-balanced", 512)):  # 768-v and 512-base models
        assert found[name].fields | {"width": size, "height": size} == found["sd15-balanced"].fields | {
            "width": size, "height": size}
    assert found["sd15-balanced"].fields == {
        "sampler": "dpmpp_2m", "schedule": "karras", "steps": 25, "cfg": 7.0, "width": 512, "height": 512,
    }
    ays = found["sd15-fast-ays"].fields
    assert (ays["sampler"], ays["schedule"], ays["steps"]) == ("dpmpp_2m", "ays", 10)
    lcm = found["sd15-lcm-4step"]
    assert (lcm.fields["sampler"], lcm.fields["steps"], lcm.fields["cfg"]) == ("lcm", 4, 1.5)
    assert "LCM" in lcm.description and "LoRA" in lcm.description
    assert found["sd15-hires"].fields["hires"] == {"scale": 2.0, "upscaler": "latent", "steps": 0, "denoise": 0.5}
    xl = found["sdxl-balanced"].fields
    assert (xl["width"], xl["height"], found["sdxl-fast-ays"].fields["schedule"]) == (1024, 1024, "ays")
    assert found["sdxl-hires"].fields["hires"]["scale"] == 1.5
    for preset in presets:  # every built-in makes a valid request
        GenerationRequest.from_dict(apply_preset(preset, {"model": "m.safetensors"}))


def test_bad_preset_files_are_reported_and_others_still_load(user_dir):
    (user_dir / "good.toml").write_text('name = "mine"\ndescription = "ok"\nsteps = 12\ncfg = 5\n')
    (user_dir / "bad-steps.toml").write_text('name = "bad"\nsteps = "abc"\n')
    (user_dir / "broken.toml").write_text("steps = = 3\n")
    (user_dir / "unknown.toml").write_text("stepz = 3\n")
    (user_dir / "unknown-name.toml").write_text("nmae = \"x\"\n")
    (user_dir / "range.toml").write_text("steps = 500\n")
    (user_dir / "family.toml").write_text('family = "sd3"\n')
    (user_dir / "hires.toml").write_text('hires = 2\n')
    (user_dir / "hires-key.toml").write_text("[hires]\nscale = 2.0\nstrength = 0.5\n")
    (user_dir / "shadow.toml").write_text('name = "sd15-balanced"\nsteps = 3\n')
    (user_dir / "notes.txt").write_text("not a preset")
    presets, problems = load_presets()
    found = by_name(presets)
    assert set(found) == BUILTINS | {"mine"}
    mine = found["mine"]
    assert mine.fields == {"steps": 12, "cfg": 5.0} and isinstance(mine.fields["cfg"], float)
    assert not mine.builtin and mine.source == user_dir / "good.toml"
    assert f"{user_dir / 'bad-steps.toml'}: key 'steps' must be an integer, got 'abc'" in problems
    by_file = {p.split(":", 1)[0]: p for p in problems}
    assert set(by_file) == {
        str(user_dir / n)
        for n in ("bad-steps.toml", "broken.toml", "unknown.toml", "unknown-name.toml", "range.toml", "family.toml", "hires.toml",
                  "hires-key.toml", "shadow.toml")
    }
    assert "not valid TOML" in by_file[str(user_dir / "broken.toml")]
    assert "unknown key 'stepz' (did you mean 'steps'? valid keys: name, " in by_file[str(user_dir / "unknown.toml")]
    assert "unknown key 'nmae' (did you mean 'name'?" in by_file[str(user_dir / "unknown-name.toml")]
    assert "'steps' = 500 is invalid: an integer from 1 to 150" in by_file[str(user_dir / "range.toml")]
    assert "'family' must be one of sd15, sd2, sdxl, flux, flux2, zimage, got 'sd3'" in by_file[str(user_dir / "family.toml")]
    assert "key 'hires' must be a table" in by_file[str(user_dir / "hires.toml")]
    assert "unknown key 'hires.strength'" in by_file[str(user_dir / "hires-key.toml")]
    assert "already used by a built-in preset" in by_file[str(user_dir / "shadow.toml")]


def test_apply_layers_defaults_preset_job():
    preset = Preset(
        "p", "", {"steps": 30, "cfg": 5.0, "sampler": "heun", "hires": {"scale": 1.5, "denoise": 0.6},
                  "extra": {"a": 1, "b": 2}},
    )
    merged = apply_preset(preset, {"model": "m", "cfg": 9.0, "hires": {"denoise": 0.3}, "extra": {"b": 3},
                                   "preset": "p"})
    assert merged["steps"] == 30 and merged["sampler"] == "heun"  # from the preset
    assert merged["cfg"] == 9.0 and merged["model"] == "m"  # job wins
    assert merged["width"] == 512 and merged["schedule"] == "normal" and merged["seed"] == -1  # defaults
    assert merged["hires"] == {"scale": 1.5, "upscaler": "latent", "steps": 0, "denoise": 0.3}
    assert merged["extra"] == {"a": 1, "b": 3}
    assert "preset" not in merged
    request = GenerationRequest.from_dict(merged)
    assert request.hires == HiresFix(scale=1.5, denoise=0.3)

    off = apply_preset(preset, {"model": "m", "hires": None})
    assert off["hires"] is None
    as_object = apply_preset(preset, {"model": "m", "hires": HiresFix(scale=3.0)})
    assert as_object["hires"] == {"scale": 3.0, "upscaler": "latent", "steps": 0, "denoise": 0.5}
    assert apply_preset(Preset("empty", "", {}), {"model": "m"})["hires"] is None


def test_apply_by_name_and_unknown_name():
    merged = apply_preset("sd15-hires", {"model": "m"})
    assert merged["hires"]["scale"] == 2.0 and merged["steps"] == 25
    with pytest.raises(PresetError, match="no preset named 'sd15-hirez'; did you mean sd15-hires"):
        apply_preset("sd15-hirez", {"model": "m"})


def test_save_user_preset_writes_toml_with_safe_name(user_dir):
    path = save_user_preset("My Preset / v2!", {"steps": 8, "hires": {"scale": 1.5}}, description="quick")
    assert path == user_dir / "my-preset-v2.toml"
    assert tomllib.loads(path.read_text()) == {
        "name": "My Preset / v2!", "description": "quick", "steps": 8, "hires": {"scale": 1.5},
    }
    found = by_name(load_presets()[0])["My Preset / v2!"]
    assert found.fields == {"steps": 8, "hires": {"scale": 1.5}} and found.source == path

    again = save_user_preset("My Preset / v2!", {"steps": 9})  # same name: overwrite in place
    assert again == path and tomllib.loads(path.read_text())["steps"] == 9
    twin = save_user_preset("my preset v2", {"steps": 10})  # same file name, other preset: numbered
    assert twin == user_dir / "my-preset-v2-2.toml"
    sneaky = save_user_preset("../../etc/passwd", {"family": "sdxl", "width": 1024, "height": 1024})
    assert sneaky.parent == user_dir
    assert by_name(load_presets()[0])["../../etc/passwd"].family == "sdxl"


def test_save_rejects_builtin_names_and_bad_fields(user_dir):
    with pytest.raises(PresetError, match="built-in and read-only"):
        save_user_preset("sd15-balanced", {"steps": 3})
    with pytest.raises(PresetError, match="key 'cfg' must be a number, got 'high'"):
        save_user_preset("x", {"cfg": "high"})
    with pytest.raises(PresetError, match="'width' = 500 is invalid"):
        save_user_preset("x", {"width": 500})
    with pytest.raises(PresetError, match="non-empty"):
        save_user_preset("  ", {})
    assert list(user_dir.iterdir()) == []


def test_rename_and_delete_user_presets(user_dir):
    old_path = save_user_preset("draft", {"steps": 6}, family="sd15")
    new_path = rename_user_preset("draft", "final look")
    assert new_path == user_dir / "final-look.toml" and not old_path.exists()
    found = by_name(load_presets()[0])
    assert "draft" not in found and found["final look"].fields == {"steps": 6}
    assert found["final look"].family == "sd15"

    same_file = rename_user_preset("final look", "Final Look")  # same file name: rewritten in place
    assert same_file == new_path and tomllib.loads(new_path.read_text())["name"] == "Final Look"

    save_user_preset("other", {"steps": 7})
    with pytest.raises(PresetError, match="a preset with that name exists"):
        rename_user_preset("Final Look", "other")
    with pytest.raises(PresetError, match="built-in and read-only"):
        rename_user_preset("sd15-balanced", "mine")
    with pytest.raises(PresetError, match="no preset named 'nope'"):
        rename_user_preset("nope", "x")

    delete_user_preset("other")
    assert "other" not in by_name(load_presets()[0])
    with pytest.raises(PresetError, match="built-in and read-only"):
        delete_user_preset("sd15-hires")
    with pytest.raises(DarkroomError):
        delete_user_preset("other")
    assert P.user_presets_dir() == user_dir


def test_asking_for_a_broken_user_preset_names_its_problem_not_missing(user_dir):
    (user_dir / "broken.toml").write_text('name = "broken"\nsteps = "many"\n')
    (user_dir / "file-name.toml").write_text('name = "by key"\nsampler = "nope"\n')
    (user_dir / "syntax.toml").write_text("steps = [\n")
    with pytest.raises(PresetError) as err:
        P.find_preset("broken")
    assert str(err.value) == (
        f"preset 'broken' cannot be used: {user_dir / 'broken.toml'}: key 'steps' must be an integer, got 'many'"
    )
    with pytest.raises(PresetError, match=r"preset 'by key' cannot be used: .*file-name\.toml: key 'sampler'"):
        P.find_preset("by key")
    with pytest.raises(PresetError, match=r"preset 'syntax' cannot be used: .*syntax\.toml: not valid TOML"):
        P.find_preset("syntax")
    with pytest.raises(PresetError, match="no preset named 'absent'"):
        P.find_preset("absent")
