"""A model's family everywhere outside the TUI: the family-specific request-field hook, presets' families,
the registry's cached header inspection, ``darkroom --list-models`` and ``--batch``'s pre-load checks."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import textwrap

import pytest

import core.models.registry as registry_mod
from cli.list_models import list_models
from core.errors import PresetError
from core.models.families import FAMILIES
from core.models.registry import ModelRegistry
from core.presets import Preset, _parse_preset, family_mismatch, fits, load_presets
from core.request import GenerationRequest, family_problems
from tests.batch_harness import RecordingRunner, batch_runner
from tests.family_files import write_header_only


@pytest.fixture
def sdxl_takes_clip_skip(monkeypatch):
    """Make ``clip_skip`` an SDXL-only field, standing in for the family fields (SDXL's ``refiner``) that
    other branches add: the hook is data-driven, so this exercises it end to end."""
    sdxl = dataclasses.replace(FAMILIES["sdxl"], request_fields=("clip_skip",))
    monkeypatch.setitem(FAMILIES, "sdxl", sdxl)


# ---- the hook ---------------------------------------------------------------------------------------------


def test_a_field_of_another_family_is_named_with_the_family_and_what_is_valid(sdxl_takes_clip_skip):
    request = GenerationRequest(model="m", clip_skip=2)
    (problem,) = family_problems(request, "sd15")
    assert problem.field == "clip_skip"
    assert str(problem) == ("clip_skip = 2 is invalid: only for SDXL models, and this model is SD1.x "
                            "(SD1.x's family-specific fields: prediction)")
    assert family_problems(request, "sdxl") == []  # its own family takes it
    assert family_problems(GenerationRequest(model="m"), "sd15") == []  # left at its default: not set
    assert family_problems({"clip_skip": 3}, "sd15")[0].value == 3  # a job's raw fields work too
    assert family_problems(request, "lora") == []  # not a family: the loader says why


def test_no_family_specific_fields_means_no_problems():
    assert family_problems(GenerationRequest(model="m", clip_skip=2), "sd15") == []


@pytest.mark.skipif("refiner" not in {f.name for f in dataclasses.fields(GenerationRequest)},
                    reason="the refiner field comes with the SDXL branch")
def test_refiner_on_sd15_is_refused():
    problems = family_problems({"refiner": "sdxl-refiner"}, "sd15")
    assert [p.field for p in problems] == ["refiner"]
    assert "SDXL" in str(problems[0])


def test_align_your_steps_on_a_family_without_its_levels_is_refused_before_it_runs():
    """A Flux model chosen after an SD1.5 AYS preset kept schedule 'ays': the job was queued and failed when
    it ran. The check now comes with the other family checks (the TUI's queue, --batch's pre-check)."""
    (problem,) = family_problems({"schedule": "ays"}, "flux")
    assert problem.field == "schedule" and "Align Your Steps has levels for" in str(problem)
    assert "SDXL" in str(problem) and "Flux" not in problem.valid
    assert family_problems({"schedule": "ays"}, "sd15") == family_problems({"schedule": "ays"}, "sdxl") == []
    assert family_problems({"schedule": "karras"}, "flux") == []


# ---- presets ----------------------------------------------------------------------------------------------


def test_a_builtin_preset_must_declare_its_family():
    with pytest.raises(PresetError, match="key 'family' is required in a built-in preset"):
        _parse_preset({"name": "x", "steps": 10}, None, True)
    assert _parse_preset({"name": "x", "steps": 10}, None, False).family is None  # a user preset may not
    builtins = [p for p in load_presets()[0] if p.builtin]
    assert builtins and all(p.family in FAMILIES for p in builtins)


def test_preset_fits_its_family_and_a_familyless_one_fits_all():
    sd15 = Preset("a", "", {}, family="sd15")
    anywhere = Preset("b", "", {})
    assert fits(sd15, "sd15") and not fits(sd15, "sdxl") and fits(sd15, None)
    assert fits(anywhere, "sdxl")
    assert family_mismatch(sd15, "sd15") is None
    message = family_mismatch(sd15, "sdxl", [sd15, anywhere])
    assert message == "preset 'a' is for SD1.x models, and this model is SDXL (there are no SDXL presets yet)"
    assert "presets for SD1.x: a" in family_mismatch(Preset("c", "", {}, family="sdxl"), "sd15", [sd15])


def test_family_size_choices():
    assert FAMILIES["sd15"].size_choices[:3] == ((512, 512), (512, 768), (768, 512))
    sdxl = FAMILIES["sdxl"].size_choices
    assert sdxl[0] == (1024, 1024)
    assert {(1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344), (1536, 640)} <= set(sdxl)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in sdxl)


# ---- the registry's inspection ------------------------------------------------------------------------------


def _mixed_folder(tmp_path):
    folder = tmp_path / "models"
    write_header_only(folder / "dreamshaper.safetensors", "sd15")
    write_header_only(folder / "xl/juggernaut.safetensors", "sdxl", dtype="BF16")
    write_header_only(folder / "sd21.safetensors", "sd2")
    write_header_only(folder / "detail-lora.safetensors", "lora")
    (folder / "broken.safetensors").write_bytes(b"12345")
    (folder / "old.ckpt").write_bytes(b"PK\x03\x04")
    return folder


def test_inspection_is_cached_by_path_mtime_and_size(tmp_path, monkeypatch):
    folder = _mixed_folder(tmp_path)
    registry = ModelRegistry([folder])
    calls = []
    real = registry_mod.inspect_file
    monkeypatch.setattr(registry_mod, "inspect_file", lambda path: calls.append(path) or real(path))
    infos = {m.name: registry.inspect(m) for m in registry.checkpoints()}
    assert infos["dreamshaper"].family == "sd15" and infos["dreamshaper"].label == "SD1.x"
    assert (infos["xl/juggernaut"].family, infos["xl/juggernaut"].dtype) == ("sdxl", "bfloat16")
    assert infos["broken"].family is None and "only 5 bytes long" in infos["broken"].problem
    assert infos["old"].label == "not inspected"
    assert len(calls) == 6
    registry.refresh()
    for m in registry.checkpoints():
        registry.inspect(m)
    assert len(calls) == 6  # nothing re-read
    changed = folder / "dreamshaper.safetensors"
    write_header_only(changed, "sdxl")
    os.utime(changed, ns=(1, 1))
    assert registry.inspect(changed).family == "sdxl"
    assert len(calls) == 7


def test_list_models_prints_family_variant_dtype_size_and_why_not(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert list_models([_mixed_folder(tmp_path)], out, err) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["name", "family", "variant", "quant", "size", "note"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["dreamshaper"].split()[1:4] == ["SD1.x", "base", "fp16"]
    assert rows["xl/juggernaut"].split()[1:4] == ["SDXL", "base", "bf16"]
    assert "not supported yet" in rows["xl/juggernaut"] or FAMILIES["sdxl"].runnable
    assert rows["sd21"].split()[1] == "SD2.x"
    assert "a LoRA, not a checkpoint" in rows["detail-lora"]
    assert "unreadable: the file is only 5 bytes long" in rows["broken"]
    assert "not inspected" in rows["old"]
    assert err.getvalue() == ""


def test_list_models_without_models_says_where_it_looked(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert list_models([tmp_path], out, err) == 3
    assert out.getvalue() == "" and "no checkpoints found in" in err.getvalue()


def test_list_models_entry_point(tmp_path, capsys):
    from cli.main import main

    assert main(["--list-models", "--models-dir", str(_mixed_folder(tmp_path))]) == 0
    assert "juggernaut" in capsys.readouterr().out


# ---- --batch ----------------------------------------------------------------------------------------------


class Runner(RecordingRunner):
    seen: list = []


@pytest.fixture
def batch(tmp_path, monkeypatch):
    run = batch_runner(tmp_path, monkeypatch, Runner)
    models = tmp_path / "models"
    write_header_only(models / "base15.safetensors", "sd15")
    write_header_only(models / "xl.safetensors", "sdxl")

    def go(text: str):
        path = tmp_path / "jobs.toml"
        path.write_text(textwrap.dedent(text))
        return run(str(path))

    return go


def test_batch_refuses_a_preset_of_another_family_before_anything_loads(batch):
    code, out, err = batch("""
        [[job]]
        model = "base15"
        preset = "sd15-balanced"
        [[job]]
        model = "xl"
        preset = "sd15-balanced"
        [[job]]
        model = "xl"
        preset = "sd15-hires"
    """)
    assert code == 2, err
    assert out == "" and Runner.seen == []
    lines = [line for line in err.splitlines() if line.startswith("darkroom: error:")]
    assert len(lines) == 2
    # the SDXL branch adds SDXL presets: then the message lists them
    pattern = (r"darkroom: error: .*jobs\.toml: job 2: model 'xl' \(SDXL\): preset 'sd15-balanced' is for SD1\.x "
               r"models, and this model is SDXL \((there are no SDXL presets yet|presets for SDXL: sdxl-.*)\)")
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert "jobs.toml: job 3: model 'xl' (SDXL): preset 'sd15-hires' is for SD1.x models" in lines[1]


def test_batch_refuses_a_field_of_another_family(batch, sdxl_takes_clip_skip, tmp_path):
    code, out, err = batch("""
        [[job]]
        model = "xl"
        clip_skip = 2
        [[job]]
        model = "base15"
        clip_skip = 2
    """)
    assert code == 2, err
    assert Runner.seen == []
    assert err.strip().splitlines() == [
        f"darkroom: error: {tmp_path / 'jobs.toml'}: job 2: model 'base15' (SD1.x): "
        "clip_skip = 2 is invalid: only for SDXL models, and this model is SD1.x (SD1.x's family-specific "
        "fields: prediction)"
    ]


def test_batch_refuses_align_your_steps_for_flux_before_anything_runs(batch, tmp_path):
    write_header_only(tmp_path / "models" / "flux-dev.safetensors", "flux")
    code, out, err = batch("""
        [[job]]
        model = "base15"
        [[job]]
        model = "flux-dev"
        schedule = "ays"
    """)
    assert code == 2, err
    assert Runner.seen == []
    assert "job 2: model 'flux-dev' (Flux.1 dev): schedule = 'ays' is invalid: Align Your Steps has levels for" in err


def test_batch_refuses_a_refiner_of_another_latent_space_before_anything_runs(batch, tmp_path):
    """An SD1.x model as an SDXL job's refiner: said before the batch runs, where the job failed when it came."""
    write_header_only(tmp_path / "models" / "xl2.safetensors", "sdxl")
    code, out, err = batch("""
        [[job]]
        model = "base15"
        [[job]]
        model = "xl"
        refiner = "base15"
        [[job]]
        model = "xl"
        refiner = "xl2"
    """)
    assert code == 2, err
    assert out == "" and Runner.seen == []
    assert err.strip().splitlines() == [
        f"darkroom: error: {tmp_path / 'jobs.toml'}: job 2: model 'xl' (SDXL): refiner 'base15' is SD1.x, whose "
        "latent space differs from SDXL's; choose an SDXL refiner for an SDXL model"
    ]


def test_batch_runs_jobs_that_fit(batch):
    code, out, err = batch("""
        [[job]]
        model = "base15"
        preset = "sd15-fast-ays"
        [[job]]
        model = "xl"
        steps = 2
    """)
    assert code == 0, err
    assert len(Runner.seen) == 2


# ---- metadata ---------------------------------------------------------------------------------------------


def test_the_darkroom_chunk_records_the_family_and_still_reads_back(tmp_path):
    import json

    from PIL import Image

    from core.metadata import find_job_images, read_family, read_request, save_image

    request = GenerationRequest(model="sdxl/juggernautXL_v9", prompt="a cat", width=1024, height=1024, seed=5)
    path = save_image(Image.new("RGB", (8, 8)), request, 5, tmp_path, family="sdxl", job_tag={"job": 1})
    with Image.open(path) as img:
        chunk = json.loads(img.text["darkroom"])
        infotext = img.text["parameters"]
    assert chunk["family"] == "sdxl"
    assert read_family(path) == "sdxl"
    assert read_request(path) == request  # the family key is no request field: dropped, not an error
    assert [found[0] for found in find_job_images(tmp_path, {"job": 1}, 0, 2e9)] == [path]
    # what A1111 writes for SDXL: the same keys as for SD1.x (its refiner keys come with the refiner)
    assert "Size: 1024x1024, Model: juggernautXL_v9, Version: " in infotext
    plain = save_image(Image.new("RGB", (8, 8)), request, 5, tmp_path)
    assert read_family(plain) is None and read_request(plain) == request


def test_the_worker_saves_the_runners_family(tmp_path):
    import time

    from PIL import Image

    from core.metadata import read_family
    from core.runner import GeneratedImage
    from core.store import JobStore
    from core.worker import Worker

    class Runner:
        def run(self, job, ctx):
            request = job.request.with_resolved_seed()
            return [GeneratedImage(Image.new("RGB", (8, 8)), request.seed, request, family="sdxl")]

    store = JobStore(tmp_path / "db.sqlite3")
    worker = Worker(store, Runner(), output_dir=tmp_path / "out")
    worker.submit(GenerationRequest(model="xl", seed=1))
    worker.start()
    deadline = time.monotonic() + 10
    while not store.history() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop(finish_current=True, timeout=10)
    assert read_family(store.history()[0].path) == "sdxl"
    store.close()
