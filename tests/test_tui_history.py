"""Pilot tests of the History screen and the no-models screen."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image
from textual.widgets import Input, Select

from core.request import GenerationRequest
from tests.tui_fakes import make_app, screen_text, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def request(prompt: str, seed: int = 11, **kw) -> GenerationRequest:
    return GenerationRequest(model="fake-model.safetensors", prompt=prompt, steps=2, seed=seed, **kw)


def pixels(path):
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


async def with_history(pilot, app, *requests):
    for r in requests:
        app.submit(r)
    images = sum(r.batch_size * r.batch_count for r in requests)
    await wait_for(pilot, lambda: len(app.store.history()) == images)
    await pilot.press("f5")
    await pilot.pause()
    return app.screen


async def test_history_newest_first_search_and_details(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await with_history(pilot, app, request("a red fox", 1), request("a blue whale", 2, cfg=5.5))
        table = screen.query_one("#history-table")
        assert [str(table.get_row_at(i)[2]) for i in range(2)] == ["a blue whale", "a red fox"]
        details = str(screen.query_one("#details-text").render())
        assert "a blue whale" in details and "cfg: 5.5" in details and "seed: 2" in details
        # the form's labels, with the names a jobs file takes
        assert "sampler: Euler (euler)" in details and "schedule: Normal (normal)" in details
        assert app.store.history()[0].path in details.replace("\n", "")
        await wait_for(pilot, lambda: screen.query_one("#thumb").display)  # the thumbnail loaded
        await pilot.press("slash")
        await pilot.press(*"fox")
        await wait_for(pilot, lambda: table.row_count == 1)
        assert str(table.get_row_at(0)[2]) == "a red fox"


async def test_generate_again_and_with_new_seed(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        await with_history(pilot, app, request("again", 99, batch_size=2))
        await pilot.press("g")
        await wait_for(pilot, lambda: len(app.store.history()) == 3)
        newest = app.store.history()[0]
        assert newest.seed in (99, 100) and newest.request.batch_size == 1
        again = [h for h in app.store.history() if h.job_id == newest.job_id]
        first_images = {h.seed: pixels(h.path) for h in app.store.history()[1:]}
        assert pixels(again[0].path) == first_images[newest.seed]  # same seed -> same picture
        await pilot.press("n")
        await wait_for(pilot, lambda: len(app.store.history()) == 4)
        assert app.store.history()[0].request.prompt == "again"


async def test_load_into_generate_copy_and_delete(tmp_path):
    app = make_app(tmp_path)
    copied = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await with_history(pilot, app, request("load me (a:1.2)", 5, cfg=3.0))
        await pilot.press("c", "s")
        assert copied == ["load me (a:1.2)", "5"]
        await pilot.press("o")
        path = app.store.history()[0].path
        assert any(path == n.message and "copied" in n.title for n in app._notifications)
        assert copied[-1] == path  # a notification's text cannot be selected: the path is on the clipboard
        await pilot.press("l")
        await pilot.pause()
        generate = app.get_generate_screen()
        assert app.screen is generate
        assert generate.query_one("#prompt").text == "load me (a:1.2)"
        assert generate.query_one("#seed", Input).value == "5"
        assert generate.query_one("#cfg", Input).value == "3.0"
        await pilot.press("f5")
        await pilot.pause()
        await pilot.press("x")
        await pilot.pause()
        assert "Delete" in screen_text(app)
        await pilot.click("#yes")
        await wait_for(pilot, lambda: app.store.history() == [])
        assert not Path(path).exists()
        assert screen.query_one("#history-table").row_count == 0


async def test_no_models_screen_names_folders_and_rescans(tmp_path):
    app = make_app(tmp_path, models=[])
    async with app.run_test(size=(140, 45)) as pilot:
        await wait_for(pilot, lambda: type(app.screen).__name__ == "NoModelsScreen")
        await wait_for(pilot, lambda: "No models found" in screen_text(app))  # pushed, then laid out
        text = screen_text(app)
        assert "/models/Stable-diffusion" in text and "--models-dir" in text
        assert "/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors" in text  # the example: a folder listed
        await pilot.press("r")  # still nothing: said so, and the screen stays
        await wait_for(pilot, lambda: any(n.message.startswith("Still no checkpoints") for n in app._notifications))
        await wait_for(pilot, lambda: type(app.screen).__name__ == "NoModelsScreen")
        app.registry.names = ["new-model.safetensors"]
        await pilot.press("r")
        generate = app.get_generate_screen()
        await wait_for(pilot, lambda: generate.query_one("#model", Select).value == "new-model.safetensors")
        assert app.screen is generate


def test_no_models_text_says_which_folder_does_not_exist(tmp_path):
    from tui.screens.no_models import no_models_text

    (tmp_path / "models").mkdir()
    lines = no_models_text([tmp_path / "models", tmp_path / "ComfyUl" / "models"]).plain.splitlines()
    assert f"  • {tmp_path / 'models'}" in lines
    assert f"  • {tmp_path / 'ComfyUl' / 'models'}  (no such folder: check the path)" in lines


def test_no_models_text_fits_80_columns_and_names_the_models_folder_above_a_lora_folder(tmp_path):
    from tui.screens.no_models import no_models_text

    models = tmp_path / "ComfyUI" / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "loras").mkdir()
    text = no_models_text([models / "loras"], [("detail_tweaker", "a LoRA, not a checkpoint")]).plain
    assert f"That is the LoRA folder; restart with its models folder:\n  darkroom --models-dir {models}\n" in text
    long = [line for line in text.splitlines() if len(line) > 74 and str(tmp_path) not in line]
    assert long == []  # the 80-column box (border and padding take 6) shows every line unwrapped
    assert "That is the" not in no_models_text([models / "checkpoints"]).plain  # a checkpoint folder: no hint


async def test_delete_asks_first_and_enter_cancels(tmp_path):
    """The confirmation's focus is on Cancel: Enter pressed out of habit keeps the file; y deletes."""
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        await with_history(pilot, app, request("keep me"))
        path = app.store.history()[0].path
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert Path(path).exists() and len(app.store.history()) == 1
        await pilot.press("x")
        await pilot.pause()
        await pilot.press("y")
        await wait_for(pilot, lambda: app.store.history() == [])
        assert not Path(path).exists()


async def test_down_or_escape_leaves_the_search_box_for_the_list(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await with_history(pilot, app, request("one"), request("two"))
        table = screen.query_one("#history-table")
        for key in ("down", "escape"):
            await pilot.press("slash")
            assert app.focused is screen.query_one("#history-search")
            await pilot.press(key)
            assert app.focused is table


async def test_a_grid_is_one_entry_that_opens_into_its_cells(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        cells = [request(f"a cat, cfg {c}", 3, cfg=c, extra={"grid": {"id": "jobs.toml: job 1", "x": i}})
                 for i, c in enumerate((5.0, 6.0, 7.0))]
        screen = await with_history(pilot, app, request("alone", 1), *cells)
        table = screen.query_one("#history-table")
        await wait_for(pilot, lambda: table.row_count == 2)
        grid_row = table.get_row("grid:jobs.toml: job 1")
        assert str(grid_row[1]) == "3 cells" and str(grid_row[2]).startswith("▸ X/Y/Z grid: a cat, cfg 7")
        table.focus()
        table.move_cursor(row=table.get_row_index("grid:jobs.toml: job 1"))
        await pilot.press("enter")
        await wait_for(pilot, lambda: table.row_count == 4)
        await pilot.press("enter")  # on one of its cells: closes it again
        await wait_for(pilot, lambda: table.row_count == 2)


async def test_the_cursor_follows_new_images_from_the_newest_and_stays_on_an_older_one(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await with_history(pilot, app, request("first", 1), request("second", 2))
        table = screen.query_one("#history-table")
        assert table.cursor_row == 0 and "second" in str(screen.query_one("#details-text").render())
        app.submit(request("third", 3))  # on the newest: the cursor moves to the new image
        await wait_for(pilot, lambda: table.row_count == 3)
        assert table.cursor_row == 0 and "third" in str(screen.query_one("#details-text").render())
        await pilot.press("down", "down")  # on an older image: it stays there
        app.submit(request("fourth", 4))
        await wait_for(pilot, lambda: table.row_count == 4)
        assert str(table.get_row_at(table.cursor_row)[2]) == "first"
        assert "first" in str(screen.query_one("#details-text").render())


class SavesEachImage:
    """As the pipeline is: each image of a batch_count job handed to ``ctx.save_images`` when made (no step
    previews); a job of several images waits for ``go`` before its last one, ``at_last`` saying it is there."""

    def __init__(self) -> None:
        self.at_last = threading.Event()
        self.go = threading.Event()

    def run(self, job, ctx):
        from core.worker import GeneratedImage
        from tests.tui_fakes import gradient

        seeds = job.request.image_seeds()
        for seed in seeds:
            if seed == seeds[-1] and len(seeds) > 1:
                self.at_last.set()
                while not self.go.wait(0.05):
                    ctx.check_cancelled()
            ctx.step(seeds.index(seed) + 1, len(seeds), image_index=seeds.index(seed))
            ctx.save_images([GeneratedImage(gradient(16, 16, seed), seed, job.request)])
        return []


async def test_history_and_the_preview_show_each_image_as_it_is_saved_before_the_job_ends(tmp_path):
    """A batch_count 3 job waiting before its last image: History already lists its first two images, the
    cursor (on the newest) on the second, and the Generate preview shows the second; the job is still
    running. Its last image then comes in the same way."""
    runner = SavesEachImage()
    app = make_app(tmp_path, runner)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await with_history(pilot, app, request("older", 1))
        table = screen.query_one("#history-table")
        job = app.submit(request("three at once", 20, batch_count=3))
        await wait_for(pilot, lambda: runner.at_last.is_set() and table.row_count == 3)
        assert app.running_job == job and app.store.get_job(job).state == "running"
        assert [str(table.get_row_at(i)[1]) for i in range(3)] == ["21", "20", "1"]
        assert table.cursor_row == 0 and "seed: 21" in str(screen.query_one("#details-text").render())
        preview = app.get_generate_screen().preview
        await wait_for(pilot, lambda: preview.image_widget.image is not None
                       and preview.image_widget.image.tobytes() == pixels(app.store.history()[0].path))
        runner.go.set()
        await wait_for(pilot, lambda: table.row_count == 4)
        assert table.cursor_row == 0 and "seed: 22" in str(screen.query_one("#details-text").render())
        await wait_for(pilot, lambda: app.running_job is None)
        await wait_for(pilot, lambda: preview.image_widget.image.tobytes() == pixels(app.store.history()[0].path))


async def test_at_80_columns_the_history_footer_fits_and_every_key_still_answers(tmp_path):
    """At 80 columns the footer cut 'c Copy prompt s Copy se…' and never showed o, u, x or ^q; the copy, path and
    upscale keys leave it there (they answer through hidden twins) and are back from 100 columns."""
    app = make_app(tmp_path)
    copied = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=(80, 24)) as pilot:
        await with_history(pilot, app, request("narrow", 5))
        footer = screen_text(app).splitlines()[-1]
        assert "Delete" in footer and "^q" in footer and "Copy" not in footer
        # the list's date is short (month-day hour:minute), so the prompt gets room
        table = app.screen.query_one("#history-table")
        created, _, prompt = (str(cell) for cell in table.get_row_at(0))
        assert len(created) == 11 and created[2] == "-" and prompt == "narrow"
        await pilot.resize_terminal(120, 40)  # wider: the long form, and the copy keys in the footer
        await wait_for(pilot, lambda: len(str(table.get_row_at(0)[0])) == 19)
        await wait_for(pilot, lambda: "c Copy prompt" in screen_text(app).splitlines()[-1])
        await pilot.press("c", "s", "o")
        assert copied == ["narrow", "5", app.store.history()[0].path]
        assert any(app.store.history()[0].path == n.message for n in app._notifications)
    wide = make_app(tmp_path / "wide")
    async with wide.run_test(size=(140, 45)) as pilot:
        await with_history(pilot, wide, request("wide", 6))
        await wait_for(pilot, lambda: "c Copy prompt" in screen_text(wide).splitlines()[-1])


def test_again_compares_with_the_entrys_own_model_hash_not_its_source_images():
    """A job made from another image (--batch from_image) carries that image's model hash; this entry's image
    was made with the local file, so Again (the runner's model check) compares with the entry's own hash."""
    from tui.screens.history import row_request

    carried = GenerationRequest(model="dream.safetensors", extra={"made_with": {"model": "dream", "hash": "a" * 10}})
    again = row_request({"request": carried, "model_hash": "b" * 10})
    assert again.extra["made_with"] == {"model": "dream.safetensors", "hash": "b" * 10}
    assert "made_with" not in row_request({"request": carried, "model_hash": None}).extra  # none recorded


def test_first_start_lists_darkroom_s_own_models_folder_as_there_to_copy_into(tmp_path, monkeypatch):
    # A new user's first start (no --models-dir): the folder the screen tells them to copy a checkpoint into
    # is created, not marked as a typo ("no such folder: check the path").
    from core.models.registry import ModelRegistry
    from tui.screens.no_models import no_models_text

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "fresh"))
    monkeypatch.delenv("DARKROOM_MODELS", raising=False)
    folders = ModelRegistry().search_dirs
    assert folders == [tmp_path / "fresh" / "data" / "models"] and folders[0].is_dir()
    text = no_models_text(folders).plain
    assert f"  • {folders[0]}\n" in text and "no such folder" not in text


@pytest.mark.parametrize("width", [100, 115, 116, 120, 123, 124, 130])
async def test_the_history_footer_fits_from_100_columns(tmp_path, width):
    """From 100 to 125 columns the footer with every key cut 'u Up▏', or at 120 '^q ▏': Delete and Quit
    did not show. The copy keys show only where the whole footer fits, and the roomier key spacing only
    from where the longest footer fits with it."""
    app = make_app(tmp_path)
    async with app.run_test(size=(width, 30)) as pilot:
        await with_history(pilot, app, request("fits", 5))
        await pilot.pause()
        footer = screen_text(app).splitlines()[-1]
        assert "x Delete" in footer and "^q Quit" in footer and footer.rstrip().endswith("^p palette"), footer


async def test_a_screen_shown_after_the_window_changed_gets_that_widths_footer_spacing(tmp_path):
    """The footer keeps its key widgets while what it shows is unchanged (StableFooter), and the screen's
    breakpoint class, which sets the keys' spacing, was not part of that: History, first built at another width
    (in the background, or before a real terminal said its size), kept that width's spacing, and at 120 columns
    its footer ran off the line ('^q ▏ ^p palett')."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("f5")
        await wait_for(pilot, lambda: "-wide" in app.screen.classes)
        history = app.screen
        await pilot.press("f2")
        await pilot.pause()
        await pilot.resize_terminal(120, 40)  # on Generate: History is in the background
        await pilot.pause()
        await pilot.press("f5")
        await pilot.pause()
        assert app.screen is history and "-medium" in history.classes and "-wide" not in history.classes
        await wait_for(pilot, lambda: screen_text(app).splitlines()[-1].rstrip().endswith("^p palette"))
        assert "^q Quit" in screen_text(app).splitlines()[-1]
