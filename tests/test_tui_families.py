"""Pilot tests: the TUI shows each model's family, and the size choices, presets and checks follow it.

The models are header-only files of several families (``tests/family_files.py``) in a real ``ModelRegistry``:
the header inspection the app runs in its model-scan worker is the real one; jobs run on the fake runner.
"""

from __future__ import annotations

import dataclasses

import pytest
from textual.widgets import Input, OptionList, Select, TextArea

from core.models.families import FAMILIES
from core.models.registry import ModelRegistry
from core.presets import load_presets
from tests.family_files import write_header_only
from tests.tui_fakes import make_app, screen_text, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def mixed_app(tmp_path, **kwargs):
    folder = tmp_path / "models"
    write_header_only(folder / "base15.safetensors", "sd15")
    write_header_only(folder / "xl.safetensors", "sdxl")
    (folder / "broken.safetensors").write_bytes(b"12345")
    return make_app(tmp_path, registry=ModelRegistry([folder]), **kwargs)


async def ready(pilot, app, model="base15"):
    screen = app.get_generate_screen()
    await wait_for(pilot, lambda: screen._models_loaded and screen.presets, timeout=30)
    screen.query_one("#model", Select).value = model
    await pilot.pause()
    return screen


def size(screen):
    return screen.query_one("#width", Input).value, screen.query_one("#height", Input).value


def options(screen, select_id):
    return [str(prompt) for prompt, value in screen.query_one(select_id, Select)._options if isinstance(value, str)]


async def test_model_picker_shows_each_family_and_why_a_file_was_not_inspected(tmp_path):
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        assert options(screen, "#model") == ["base15  SD1.x fp16", "broken  unreadable", "xl  SDXL fp16"]
        assert app.model_families == {"base15": "SD1.x", "xl": "SDXL"}
        assert "base15  SD1.x fp16" in screen_text(app)


async def test_size_follows_the_family_keeping_the_aspect_ratio(tmp_path):
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        assert size(screen) == ("512", "512")
        assert options(screen, "#size-preset")[:3] == ["512×512", "512×768", "768×512"]
        screen.query_one("#model", Select).value = "xl"
        await pilot.pause()
        assert size(screen) == ("1024", "1024")
        assert "1216×832" in options(screen, "#size-preset") and "512×768" not in options(screen, "#size-preset")
        assert any(n.message == "Size 512×512 → 1024×1024 for SDXL" for n in app._notifications)
        screen.query_one("#width", Input).value = "832"  # a portrait by hand
        screen.query_one("#height", Input).value = "1216"
        screen.query_one("#model", Select).value = "base15"
        await pilot.pause()
        assert size(screen) == ("512", "768")
        screen.query_one("#width", Input).value = "640"  # the same family keeps a hand-made size
        screen.query_one("#model", Select).value = "broken"
        await pilot.pause()
        screen.query_one("#model", Select).value = "base15"
        await pilot.pause()
        assert size(screen) == ("640", "768")


async def test_a_history_rows_size_is_kept_with_its_model(tmp_path):
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        app.load_into_generate({"model": "xl", "width": 896, "height": 1152})
        await pilot.pause()
        assert screen.query_one("#model", Select).value == "xl"
        assert size(screen) == ("896", "1152")


async def test_presets_offered_are_the_models_familys_and_another_familys_is_refused(tmp_path):
    sd15_presets = sorted(p.name for p in load_presets()[0] if p.family == "sd15")
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        assert sorted(options(screen, "#preset-picker")) == sd15_presets
        screen.query_one("#model", Select).value = "xl"
        await pilot.pause()
        assert not set(options(screen, "#preset-picker")) & set(sd15_presets)
        steps = screen.query_one("#steps", Input).value
        screen.apply_preset(next(p for p in screen.presets if p.name == "sd15-fast-ays"))
        await pilot.pause()
        assert screen.query_one("#steps", Input).value == steps  # nothing applied
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert errors and errors[-1].startswith(
            "Not applied: preset 'sd15-fast-ays' is for SD1.x models, and this model is SDXL"
        )


async def test_presets_screen_lists_what_fits_the_model(tmp_path):
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app, "xl")
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.all_presets)
        presets = app.screen
        hidden = sum(p.family not in (None, "sdxl") for p in presets.all_presets)
        assert all(p.family in (None, "sdxl") for p in presets.presets)
        assert f"Presets for SDXL ({hidden} hidden)" in screen_text(app)
        await pilot.press("f2")
        screen.query_one("#model", Select).value = "base15"
        await pilot.pause()
        await pilot.press("f3")
        await pilot.pause()
        assert "sd15-balanced" in [p.name for p in presets.presets]
        assert "Presets for SD1.x" in screen_text(app)
        assert len(presets.query_one(OptionList).options) == len(presets.presets)


async def test_queueing_refuses_a_field_of_another_family(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "sdxl", dataclasses.replace(FAMILIES["sdxl"], request_fields=("clip_skip",)))
    app = mixed_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#prompt", TextArea).load_text("a cat")
        screen._write_advanced_state({"clip_skip": "2"})
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert not app.store.list_jobs()
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert errors == ["Clip: clip_skip = 2 is invalid: only for SDXL models, and this model is SD1.x "
                          "(SD1.x's family-specific fields: prediction)"]
        screen.query_one("#model", Select).value = "xl"
        await pilot.pause()
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert len(app.store.list_jobs()) == 1


async def test_queue_and_history_show_the_family(tmp_path):
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app, "xl")
        screen.query_one("#prompt", TextArea).load_text("a cat")
        screen.query_one("#steps", Input).value = "2"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.history()) == 1)
        await pilot.press("f4")
        await pilot.pause()
        assert "xl · SDXL" in screen_text(app)
        from tui.screens.history import describe

        assert "family: SDXL" in describe(app.store.history()[0], app.model_families).plain


async def test_a_folder_without_a_usable_checkpoint_says_what_each_file_is(tmp_path):
    folder = tmp_path / "models"
    write_header_only(folder / "detail-lora.safetensors", "lora")
    (folder / "cut.safetensors").write_bytes(b"123")
    app = make_app(tmp_path, registry=ModelRegistry([folder]))
    async with app.run_test(size=(120, 35)) as pilot:
        await wait_for(pilot, lambda: "Found there" in screen_text(app), timeout=40)
        text = screen_text(app)
        assert "Found there, but none is a checkpoint Darkroom can use:" in text
        assert "detail-lora: a LoRA, not a checkpoint" in text
        assert "cut: the file is only 3 bytes long" in text


async def test_a_preset_saved_from_the_form_records_the_models_family(tmp_path):
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        await ready(pilot, app, "xl")
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.all_presets)
        presets = app.screen
        await pilot.press("s")
        await pilot.pause()
        await pilot.press(*"xl look")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "xl look" in [p.name for p in presets.presets])
        saved = next(p for p in load_presets()[0] if p.name == "xl look")
        assert saved.family == "sdxl" and not saved.builtin


async def test_the_command_palette_names_each_models_family_and_offers_fitting_presets(tmp_path):
    from tui.commands import DarkroomCommands

    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        await ready(pilot, app, "xl")
        commands = {title: help_text for title, _callback, help_text in DarkroomCommands(app.screen)._commands("")}
        assert commands["Model: xl"] == "use this SDXL checkpoint"
        assert commands["Model: base15"] == "use this SD1.x checkpoint"
        assert commands["Model: broken"].startswith("unreadable: ")  # says why, offers nothing
        assert not [title for title in commands if title.startswith("Preset: sd15-")]


async def test_the_palette_rescans_the_models_folders(tmp_path):
    """A checkpoint copied in while the app runs is found from the palette, not only from the no-models screen."""
    from tui.commands import DarkroomCommands

    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        write_header_only(tmp_path / "models" / "added-later.safetensors", "sd15")
        commands = {title: callback for title, callback, _ in DarkroomCommands(app.screen)._commands("")}
        commands["Models: rescan the models folders"]()
        await wait_for(pilot, lambda: "added-later" in [str(m.name) for m in screen.models])
        assert any(option.startswith("added-later") for option in options(screen, "#model"))
        assert screen.query_one("#model", Select).value == "base15"  # the chosen model stays


async def test_a_size_already_about_the_familys_area_is_kept(tmp_path):
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#width", Input).value = "960"  # SDXL-sized by hand while an SD1.x model is chosen
        screen.query_one("#height", Input).value = "1088"
        screen.query_one("#model", Select).value = "xl"
        await pilot.pause()
        assert size(screen) == ("960", "1088")


async def test_flux_shows_guidance_hides_clip_skip_and_takes_cfg_1(tmp_path):
    folder = tmp_path / "models"
    write_header_only(folder / "base15.safetensors", "sd15")
    write_header_only(folder / "fluxdev.safetensors", "flux")
    app = make_app(tmp_path, registry=ModelRegistry([folder]), start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await ready(pilot, app)
        await wait_for(pilot, lambda: screen._advanced_mounted, timeout=30)
        assert not screen.query_one("#guidance-row").display and screen.query_one("#clip-row").display
        screen.query_one("#model", Select).value = "fluxdev"
        await pilot.pause()
        assert screen.query_one("#guidance-row").display and not screen.query_one("#clip-row").display
        assert screen.query_one("#cfg", Input).value == "1.0"
        assert any(n.message == "CFG 7 → 1 for Flux.1" for n in app._notifications)
        screen.query_one("#prompt", TextArea).load_text("a (lighthouse:1.2)")
        screen.query_one("#guidance", Input).value = "4"
        await pilot.press("ctrl+j")
        await pilot.pause()
        (job,) = app.store.list_jobs()
        assert (job.request.guidance, job.request.cfg) == (4.0, 1.0)
        assert any("ignored" in n.message and n.severity == "warning" for n in app._notifications)
        screen.query_one("#model", Select).value = "base15"
        await pilot.pause()
        assert not screen.query_one("#guidance-row").display and screen.query_one("#cfg", Input).value == "7.0"
        assert screen.build_request().guidance is None  # a hidden field is not sent


async def test_flux2_klein_takes_its_4_steps_cfg_1_and_hides_guidance_and_clip_skip(tmp_path):
    folder = tmp_path / "models"
    write_header_only(folder / "base15.safetensors", "sd15")
    write_header_only(folder / "klein.safetensors", "flux2")
    app = make_app(tmp_path, registry=ModelRegistry([folder]), start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await ready(pilot, app)
        await wait_for(pilot, lambda: screen._advanced_mounted, timeout=30)
        screen.query_one("#model", Select).value = "klein"
        await pilot.pause()
        assert not screen.query_one("#guidance-row").display and not screen.query_one("#clip-row").display
        assert (screen.query_one("#cfg", Input).value, screen.query_one("#steps", Input).value) == ("1.0", "4")
        assert size(screen) == ("1024", "1024")


async def test_a_first_start_takes_the_first_models_family_size_and_shows_the_whole_guidance_label(tmp_path):
    folder = tmp_path / "models"
    write_header_only(folder / "fluxdev.safetensors", "flux")
    app = make_app(tmp_path, registry=ModelRegistry([folder]), start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen._models_loaded, timeout=30)
        await pilot.pause()
        assert size(screen) == ("1024", "1024")  # no saved size: Flux.1's own, not the general 512
        assert "Guidance 3.5" in screen_text(app)  # the label is not cut to "Guidanc"
    # a size the user left last time is kept
    (tmp_path / "settings.json").write_text('{"width": 768, "height": 1344, "model": "fluxdev"}')
    again = make_app(tmp_path, registry=ModelRegistry([folder]), start_worker=False)
    async with again.run_test(size=(120, 40)) as pilot:
        screen = again.get_generate_screen()
        await wait_for(pilot, lambda: screen._models_loaded, timeout=30)
        await pilot.pause()
        assert size(screen) == ("768", "1344")


async def test_zimage_is_named_takes_turbos_defaults_and_its_presets(tmp_path):
    folder = tmp_path / "models"
    write_header_only(folder / "checkpoints" / "base15.safetensors", "sd15")
    write_header_only(folder / "diffusion_models" / "z_image_turbo_bf16.safetensors", "zimage", dtype="BF16")
    app = make_app(tmp_path, registry=ModelRegistry([folder]), start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await ready(pilot, app)
        await wait_for(pilot, lambda: screen._advanced_mounted, timeout=30)
        assert "z_image_turbo_bf16  Z-Image bf16" in options(screen, "#model")
        screen.query_one("#model", Select).value = "z_image_turbo_bf16"
        await pilot.pause()
        assert app.model_families["z_image_turbo_bf16"] == "Z-Image"
        assert (screen.query_one("#cfg", Input).value, screen.query_one("#steps", Input).value) == ("1.0", "8")
        assert not screen.query_one("#clip-row").display and not screen.query_one("#guidance-row").display
        assert sorted(options(screen, "#preset-picker")) == ["z-image-base", "z-image-turbo"]
        assert size(screen) == ("1024", "1024")


async def test_lora_picker_lists_the_chosen_models_loras_first_and_the_others_dimmed_with_their_family(tmp_path):
    from tui.screens.networks import NetworksScreen

    folder = tmp_path / "models"
    write_header_only(folder / "checkpoints" / "base15.safetensors", "sd15")
    write_header_only(folder / "checkpoints" / "xl.safetensors", "sdxl")
    for name, kind in (("a-flux-style", "lora_flux"), ("b-xl-detail", "lora_sdxl"), ("c-ink", "lora_sd15"),
                       ("d-unmarked", "lora")):
        write_header_only(folder / "loras" / f"{name}.safetensors", kind)
    app = make_app(tmp_path, registry=ModelRegistry([folder]))
    async with app.run_test(size=(120, 35)) as pilot:
        for model, listed, note in (
            ("base15", ["c-ink  LoRA", "d-unmarked  LoRA", "a-flux-style  LoRA for Flux.1", "b-xl-detail  LoRA for SDXL"],
             "4 LoRAs, 0 embeddings (2 for other model families, listed last)"),
            ("xl", ["b-xl-detail  LoRA", "d-unmarked  LoRA", "a-flux-style  LoRA for Flux.1", "c-ink  LoRA for SD1.x"],
             "4 LoRAs, 0 embeddings (2 for other model families, listed last)"),
        ):
            screen = await ready(pilot, app, model)
            await pilot.press("ctrl+n")
            await wait_for(pilot, lambda: isinstance(app.screen, NetworksScreen) and app.screen.entries)
            picker = app.screen
            shown = picker.query_one("#networks-list", OptionList)
            assert [str(shown.get_option_at_index(i).prompt) for i in range(shown.option_count)] == listed
            assert note in screen_text(app)
            await pilot.press("enter")  # the first, a LoRA of the chosen model's family
            await wait_for(pilot, lambda generate=screen: app.screen is generate)
            assert screen.query_one("#prompt", TextArea).text.endswith(f"<lora:{listed[0].split()[0]}:1>")


async def test_a_model_file_the_picker_calls_unreadable_is_not_queued(tmp_path):
    """The picker has read the header (``broken  unreadable``); queueing it would only fail when it runs."""
    from core.errors import DarkroomError

    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app, model="broken")
        with pytest.raises(DarkroomError, match=r"model = 'broken' is invalid: the file cannot be loaded: the file is "
                                                r"only 5 bytes long"):
            screen.build_request()
        screen.query_one("#model", Select).value = "base15"
        await pilot.pause()
        assert screen.build_request().model == "base15"


async def test_a_lora_for_another_family_or_in_no_folder_is_not_queued(tmp_path):
    """The picker lists other families' LoRAs (dimmed); one of them, or a misspelled tag, would only fail when
    the job ran."""
    from core.errors import DarkroomError

    folder = tmp_path / "models"
    write_header_only(folder / "checkpoints" / "base15.safetensors", "sd15")
    write_header_only(folder / "loras" / "xl-detail.safetensors", "lora_sdxl")
    write_header_only(folder / "loras" / "ink.safetensors", "lora_sd15")
    app = make_app(tmp_path, registry=ModelRegistry([folder]))
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        prompt = screen.query_one("#prompt", TextArea)
        prompt.load_text("a cat <lora:ink:0.7> <lora:xl-detail:1> <lora:inkk:1>")
        with pytest.raises(DarkroomError) as refused:
            screen.build_request()
        lines = str(refused.value).splitlines()
        assert lines[0] == ("LoRA: loras = 'xl-detail' is invalid: xl-detail.safetensors is an SDXL LoRA (by its keys), "
                            "but the model is SD1.x")
        assert lines[1].startswith("LoRA: loras = 'inkk' is invalid: ") and "ink" in lines[1] and len(lines) == 2
        prompt.load_text("a cat <lora:ink:0.7>")
        assert screen.build_request().lora_refs()[0].name == "ink"


async def test_a_flow_model_chosen_after_an_sd_preset_moves_the_sampler_and_schedule_it_cannot_run(tmp_path):
    folder = tmp_path / "models"
    write_header_only(folder / "base15.safetensors", "sd15")
    write_header_only(folder / "flux-dev.safetensors", "flux")
    app = make_app(tmp_path, registry=ModelRegistry([folder]))
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#sampler", Select).value = "euler_ancestral"  # as an SD1.5 AYS preset leaves them
        screen.query_one("#schedule", Select).value = "ays"
        screen.query_one("#model", Select).value = "flux-dev"
        await pilot.pause()
        assert (screen.query_one("#sampler", Select).value, screen.query_one("#schedule", Select).value) == (
            "euler", "normal")
        messages = [n.message for n in app._notifications]
        assert "Sampler Euler a → Euler for Flux.1" in messages
        assert "Schedule Align Your Steps → Normal for Flux.1" in messages
        assert screen.build_request().sampler == "euler"
        screen.query_one("#sampler", Select).value = "dpmpp_2m"  # what the family runs stays
        screen.query_one("#model", Select).value = "base15"
        await pilot.pause()
        assert screen.query_one("#sampler", Select).value == "dpmpp_2m"


async def test_an_sdxl_images_refiner_is_kept_and_sent_and_let_go_for_an_sd15_model(tmp_path):
    """Ctrl+O on an SDXL image made with a refiner: the refiner is said, kept (the form has no row for it) and
    sent with the job, where it was dropped without a word (another image); choosing an SD1.x model lets it go,
    since the queue would refuse it and nothing in the form clears it."""
    from core.metadata import infotext_to_request

    write_header_only(tmp_path / "models" / "xlref.safetensors", "sdxl")
    app = mixed_app(tmp_path)
    async with app.run_test(size=(120, 35)) as pilot:
        screen = await ready(pilot, app, model="xl")
        text = ("a harbour\nSteps: 6, Sampler: Euler, Schedule type: Normal, CFG scale: 7, Seed: 5, Size: 1024x1024, "
                "Model: xl, Refiner: xlref, Refiner switch at: 0.6, Version: v1.10.1")
        screen.apply_image_request(infotext_to_request(text), "harbour.png")
        await pilot.pause()
        assert any("refiner xlref from 0.6" in n.message for n in app._notifications)
        request = screen.build_request()
        assert (request.refiner, request.refiner_switch) == ("xlref", 0.6)
        assert "refiner: xlref" in screen_text(app)
        screen.query_one("#model", Select).value = "base15"
        await pilot.pause()
        request = screen.build_request()
        assert (request.model, request.refiner, request.refiner_switch) == ("base15", None, 0.8)
        assert "refiner:" not in screen_text(app)


async def test_a_split_model_whose_text_encoder_is_in_no_folder_is_not_queued(tmp_path):
    """Flux.1 kept as ComfyUI's split files without its T5: --batch names the missing part before anything runs;
    the TUI queued the job, which failed when it ran (after the jobs before it)."""
    from core.models.testing import write_random_flux_split_set

    write_random_flux_split_set(tmp_path, "comfyui", parts=("clip_l", "vae"))
    app = make_app(tmp_path, registry=ModelRegistry([tmp_path / "models"]))
    async with app.run_test(size=(120, 35), notifications=True) as pilot:
        screen = await ready(pilot, app, model="flux1-dev")
        screen.query_one("#prompt", TextArea).load_text("a fox")
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: any("Flux.1 needs a T5-XXL text encoder: none in" in n.message
                                          for n in app._notifications))
        assert app.store.list_jobs() == []
