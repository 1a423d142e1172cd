"""Pilot tests of the Presets screen: list, apply to Generate, save current, rename, delete."""

from __future__ import annotations

import pytest
from textual.widgets import Checkbox, Input, OptionList, Select

from core.presets import load_presets
from tests.tui_fakes import make_app, screen_text, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


async def open_presets(pilot, app):
    generate = app.get_generate_screen()
    await wait_for(pilot, lambda: generate.query_one("#model", Select).value == "fake-model.safetensors")
    await pilot.press("f3")
    await wait_for(pilot, lambda: len(app.screen.presets) > 0)
    return app.screen


def user_names():
    return sorted(p.name for p in load_presets()[0] if not p.builtin)


async def test_builtin_presets_listed_with_values_and_applied(tmp_path):
    builtin = {p.name: p for p in load_presets()[0] if p.builtin}
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await open_presets(pilot, app)
        text = screen_text(app)
        for name in builtin:
            assert name in text
        option_list = screen.query_one(OptionList)
        index = [p.name for p in screen.presets].index("sd15-fast-ays")
        option_list.highlighted = index
        await pilot.pause()
        text = screen_text(app)
        assert "Align Your Steps" in text or "ays" in text  # the values table shows the preset's fields
        await pilot.press("a")
        await pilot.pause()
        generate = app.get_generate_screen()
        assert app.screen is generate
        fields = builtin["sd15-fast-ays"].fields
        assert generate.query_one("#steps", Input).value == str(fields["steps"])
        assert generate.query_one("#sampler", Select).value == fields["sampler"]
        assert generate.query_one("#schedule", Select).value == fields["schedule"]
        assert generate.build_request().steps == fields["steps"]


async def test_save_rename_delete_user_preset(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        generate = app.get_generate_screen()
        screen = await open_presets(pilot, app)
        generate.query_one("#steps", Input).value = "37"
        await pilot.press("s")
        await pilot.pause()
        await pilot.press(*"my look")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "my look" in [p.name for p in screen.presets])
        saved = next(p for p in load_presets()[0] if p.name == "my look")
        assert saved.fields["steps"] == 37 and not saved.builtin
        assert screen.selected().name == "my look"

        await pilot.press("r")
        await pilot.pause()
        answer = app.screen.query_one("#answer", Input)
        answer.value = "renamed look"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "renamed look" in [p.name for p in screen.presets])
        assert user_names() == ["renamed look"]

        await pilot.press("x")
        await pilot.pause()
        await pilot.click("#yes")
        await wait_for(pilot, lambda: "renamed look" not in [p.name for p in screen.presets])
        assert user_names() == []


async def test_builtin_preset_cannot_be_deleted(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await open_presets(pilot, app)
        screen.query_one(OptionList).highlighted = 0
        assert screen.selected().builtin
        await pilot.press("x")
        await pilot.pause()
        assert app.screen is screen  # no confirmation dialog
        assert any("Built-in" in n.message for n in app._notifications)


async def test_saving_under_a_taken_name_asks_again_with_the_reason(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await open_presets(pilot, app)
        await pilot.press("s")
        await pilot.pause()
        app.screen.query_one("#keep-cfg", Checkbox).value = False
        await pilot.press(*"sd15-balanced", "enter")
        await pilot.pause()
        answer = app.screen.query_one("#answer", Input)  # the dialog again, the name and the ticks kept
        assert answer.value == "sd15-balanced" and "built-in" in screen_text(app)
        assert app.screen.query_one("#keep-cfg", Checkbox).value is False
        assert app.screen.query_one("#keep-steps", Checkbox).value is True
        answer.value = "mine"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "mine" in [p.name for p in screen.presets])
        assert user_names() == ["mine"]
        assert "cfg" not in next(p for p in load_presets()[0] if p.name == "mine").fields


async def test_save_current_keeps_the_ticked_fields_not_the_prompt_seed_or_init_image_by_default(tmp_path):
    from PIL import Image
    from textual.widgets import TextArea

    source = tmp_path / "source.png"
    Image.new("RGB", (8, 8)).save(source)
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        generate = app.get_generate_screen()
        screen = await open_presets(pilot, app)
        generate.query_one("#prompt", TextArea).load_text("a one-off picture")
        generate.query_one("#negative_prompt", TextArea).load_text("blurry")
        generate.query_one("#seed", Input).value = "1234"
        generate.query_one("#init_image", Input).value = str(source)
        generate.query_one("#steps", Input).value = "31"
        await pilot.press("s")
        await pilot.pause()
        dialog = app.screen
        ticks = {box.id.removeprefix("keep-"): box.value for box in dialog.query(Checkbox)}
        assert {name for name, on in ticks.items() if not on} == {"prompt", "negative_prompt", "seed", "init_image"}
        assert {"model", "sampler", "steps", "cfg", "width", "height"} <= {n for n, on in ticks.items() if on}
        assert "steps: 31" in screen_text(app) and "Keep in the preset" in screen_text(app)  # fits 80x24
        await pilot.press(*"look")
        await pilot.press("enter")
        await wait_for(pilot, lambda: "look" in [p.name for p in screen.presets])
        saved = next(p for p in load_presets()[0] if p.name == "look").fields
        assert saved["steps"] == 31 and saved["model"] == "fake-model.safetensors"
        assert not {"prompt", "negative_prompt", "seed", "init_image"} & set(saved)
        assert any(n.message.startswith("Saved preset look (model, ") for n in app._notifications)

        # Another time: the prompt ticked, the steps not (a click or space on a box toggles it).
        await pilot.press("s")
        await pilot.pause()
        dialog = app.screen
        dialog.query_one("#keep-prompt", Checkbox).value = True
        dialog.query_one("#keep-steps", Checkbox).value = False
        dialog.query_one("#answer", Input).value = "with prompt"
        await pilot.click("#ok")
        await wait_for(pilot, lambda: "with prompt" in [p.name for p in screen.presets])
        saved = next(p for p in load_presets()[0] if p.name == "with prompt").fields
        assert saved["prompt"] == "a one-off picture" and "steps" not in saved and "seed" not in saved


async def test_save_current_of_a_txt2img_form_leaves_the_img2img_fields_unticked(tmp_path):
    # Without an init image the form still holds denoise 0.75, mask blur 4 and inpaint area "whole"; ticked,
    # every saved preset carried them and reset the img2img settings of a form it was applied to later.
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await open_presets(pilot, app)
        await pilot.press("s")
        await pilot.pause()
        ticks = {box.id.removeprefix("keep-"): box.value for box in app.screen.query(Checkbox)}
        assert {"denoise", "mask_blur", "inpaint_area"} <= set(ticks)  # offered ...
        assert not any(ticks[name] for name in ("denoise", "mask_blur", "inpaint_area"))  # ... not ticked
        assert ticks["steps"] and ticks["model"]
        await pilot.press(*"plain", "enter")
        await wait_for(pilot, lambda: "plain" in [p.name for p in load_presets()[0]])
        saved = next(p for p in load_presets()[0] if p.name == "plain").fields
        assert not {"denoise", "mask_blur", "inpaint_area"} & set(saved) and saved["steps"] == 20


async def test_save_dialog_ticks_are_readable_without_colours(tmp_path):
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 35)) as pilot:
        app.get_generate_screen().query_one("#prompt").load_text("a fox")
        await open_presets(pilot, app)
        await pilot.press("s")
        await pilot.pause()
        text = screen_text(app)
        assert "▐ ▌ prompt: a fox" in text and "▐ ▌ seed: -1" in text and "▐X▌ steps: 20" in text
        app.screen.query_one("#keep-prompt", Checkbox).value = True
        await pilot.pause()
        assert "▐X▌ prompt: " in screen_text(app)


async def test_a_cache_preset_reaches_the_request_and_the_next_preset_turns_it_off(tmp_path):
    builtin = {p.name: p for p in load_presets()[0] if p.builtin}
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        generate = app.get_generate_screen()
        await wait_for(pilot, lambda: generate.query_one("#model", Select).value == "fake-model.safetensors")
        generate.apply_preset(builtin["sd15-fast-deepcache"])
        await pilot.pause()
        request = generate.build_request()
        assert (request.deepcache_interval, request.deepcache_branch) == (3, 0)
        assert "deepcache_interval: 3" in screen_text(app)  # the form says what it sends besides its fields
        generate.apply_preset(builtin["sd15-fast-ays"])
        await pilot.pause()
        assert generate.build_request().deepcache_interval == 1


async def test_save_current_after_applying_a_preset(tmp_path):
    # Applying a preset sets the form's kept fields (invert_mask among them); saving the form as a
    # preset then has to take a bool, not refuse it as "must be a table".
    builtin = {p.name: p for p in load_presets()[0] if p.builtin}
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(140, 45)) as pilot:
        generate = app.get_generate_screen()
        screen = await open_presets(pilot, app)
        generate.apply_preset(builtin["sd15-hires"])
        generate.set_form_values({"invert_mask": True})  # at its default (False) it is not offered
        await pilot.pause()
        await pilot.press("f3")
        await pilot.press("s")
        await pilot.pause()
        await pilot.press(*"after hires", "enter")
        await wait_for(pilot, lambda: "after hires" in [p.name for p in screen.presets])
        saved = next(p for p in load_presets()[0] if p.name == "after hires").fields
        assert saved["invert_mask"] is True and saved["hires"]["scale"] == 2.0


async def test_preset_table_values_are_words_not_python_reprs(tmp_path):
    # The hires table read "{'scale': 2.0, 'upscaler': 'latent', 'steps': 0, 'denoi" (cut at the pane's edge).
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await open_presets(pilot, app)
        names = [p.name for p in screen.presets]
        for name, shown in (("sd15-hires", "scale 2.0, upscaler latent, steps 0, denoise 0.5"),
                            ("sd15-lcm-lora", "name lcm-lora-sdv1-5, weight 1.0")):
            screen.query_one(OptionList).highlighted = names.index(name)
            await pilot.pause()
            text = screen_text(app)
            assert shown in text and "{'" not in text, name


async def test_save_current_leaves_out_the_hidden_fields_at_their_defaults(tmp_path):
    # "Use settings" on an image keeps every field the form has no widget for; those at their defaults
    # (deepcache_interval 1, masked_content original, ...) are no setting of the user's
    app = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        generate = app.get_generate_screen()
        await open_presets(pilot, app)
        generate.set_form_values({"deepcache_interval": 1, "fbcache_threshold": 0.0, "invert_mask": False,
                                  "masked_content": "fill"})
        await pilot.press("s")
        await pilot.pause()
        order = [box.id.removeprefix("keep-") for box in app.screen.query(Checkbox)]
        ticks = set(order)
        assert "masked_content" in ticks and "steps" in ticks
        assert not {"deepcache_interval", "fbcache_threshold", "invert_mask"} & ticks
        assert order[0] == "model" and order[-1] == "masked_content"  # the form's fields first, kept ones last


async def test_a_broken_preset_file_is_said_once_listed_on_the_screen_and_read_again_when_fixed(tmp_path):
    """A broken file in the presets folder was a toast at every reload, twice (the form and the screen each
    said it) after each save, and nowhere once the toasts were gone; a fixed file showed only after a restart."""
    from core.presets import user_presets_dir

    folder = user_presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    broken = folder / "typo.toml"
    broken.write_text('name = "typo"\nstpes = 4\n')
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45), notifications=True) as pilot:
        screen = await open_presets(pilot, app)
        await wait_for(pilot, lambda: "stpes" in screen_text(app))

        def said() -> int:
            return sum("stpes" in n.message for n in app._notifications)

        assert said() == 1
        assert f"• {broken}: unknown key 'stpes' (did you mean 'steps'?" in str(
            screen.query_one("#preset-problems-text").render())
        app.get_generate_screen().query_one("#steps", Input).value = "37"
        await pilot.press("s")
        await wait_for(pilot, lambda: app.screen.query("#answer"))
        app.screen.query_one("#answer", Input).value = "mine"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "mine" in [p.name for p in screen.presets])
        await pilot.pause()
        assert said() == 1  # the save read the folder again: the same file is not said again
        broken.write_text('name = "typo"\nsteps = 4\n')  # fixed in an editor
        await pilot.press("f2")
        await pilot.press("f3")
        await wait_for(pilot, lambda: "typo" in [p.name for p in screen.presets])
        assert not screen.query_one("#preset-problems").display
