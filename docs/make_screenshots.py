"""Write an SVG screenshot of every screen of the terminal app to docs/screenshots/.

Runs the app headless with the fake runner (tests/tui_fakes.py: no torch, no model) and the half-block image
widget, so the pictures are reproducible on any machine:

    DARKROOM_HOME=$(mktemp -d) .venv/bin/python docs/make_screenshots.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DARKROOM_HOME", tempfile.mkdtemp(prefix="darkroom-shots-"))
os.environ.setdefault("DARKROOM_FAKE_PREVIEW", "64")
os.environ.setdefault("DARKROOM_FAKE_SIZE", "256")
os.environ["COLORTERM"] = "truecolor"  # the same colours whatever terminal the script is run from

from core.errors import DarkroomError  # noqa: E402
from core.request import GenerationRequest  # noqa: E402
from tests.tui_fakes import FakeRunner, make_app, screen_text, wait_for  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
SIZE = (120, 40)


class ScreenshotRunner(FakeRunner):
    """Finishes jobs, except the one whose prompt asks to hold: it stops at step 12 until released, and
    prompts containing "fail" fail."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.holding = threading.Event()

    def run(self, job, ctx):
        if "fail" in job.request.prompt:
            raise DarkroomError(f"{job.request.model}: not a checkpoint (no UNet weights found)")
        if "hold" not in job.request.prompt:
            return super().run(job, ctx)
        request = job.request.with_resolved_seed()
        from tests.tui_fakes import gradient

        for step in range(1, 13):
            ctx.step(step, request.steps, preview=gradient(64, 64, request.seed, step / request.steps))
        self.holding.set()
        while not self.release.wait(0.05):
            ctx.check_cancelled()
        return super().run(job, ctx)


def request(prompt: str, seed: int, **kw) -> GenerationRequest:
    return GenerationRequest(model="fake-model.safetensors", prompt=prompt, seed=seed, steps=20, **kw)


async def shoot() -> list[Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tmp = Path(tempfile.mkdtemp(prefix="darkroom-shots-app-"))
    runner = ScreenshotRunner()
    app = make_app(tmp, runner)

    def save(name: str) -> None:
        path = OUT / f"{name}.svg"
        path.write_text(app.export_screenshot(title=f"Darkroom — {name}"), encoding="utf-8")
        written.append(path)
        if "--text" in sys.argv:  # plain-text view of the same frame, for checking without an SVG viewer
            print(f"--- {name}\n{screen_text(app)}")

    async with app.run_test(size=SIZE, notifications=False) as pilot:
        generate = app.get_generate_screen()
        await wait_for(pilot, lambda: generate.models and generate.presets)
        for prompt, seed in [("a lighthouse on a cliff at dusk, (dramatic sky:1.2), [oil painting]", 1),
                             ("portrait of an old fisherman, film grain", 2)]:
            app.submit(request(prompt, seed))
        app.submit(request("fail: a broken checkpoint", 3))
        await wait_for(pilot, lambda: len(app.store.history()) == 2 and app.running_job is None, 30)
        generate.set_form_values({"prompt": "a red fox in the snow, hold", "negative_prompt": "blurry",
                                  "steps": 20, "seed": 1234, "seed_lock": True})
        await pilot.pause()
        generate.action_queue()
        await wait_for(pilot, lambda: runner.holding.is_set(), 30)
        for prompt, seed in [("a tiny robot reading a book", 5), ("a city street in the rain", 6)]:
            app.submit(request(prompt, seed))
        await pilot.pause(0.5)
        save("generate-running")

        await pilot.press("f4")
        await pilot.pause(0.3)
        save("queue")

        await pilot.press("ctrl+q")
        await pilot.pause(0.3)
        save("quit-dialog")
        await pilot.press("escape")
        await pilot.pause()

        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.presets)
        await pilot.pause(0.2)
        save("presets")

        runner.release.set()
        await wait_for(pilot, lambda: app.running_job is None and len(app.store.history()) >= 3, 30)
        await wait_for(pilot, lambda: not app.store.list_jobs(states=["pending", "running"]), 30)
        await pilot.press("f5")
        await pilot.pause(0.5)
        save("history")

        await pilot.press("f2")
        await pilot.pause(0.5)
        save("generate")

        # The advanced section, opened and filled the way a preset with hires fix and a history row's VAE do.
        generate.set_form_values({"vae": "vae-ft-mse-840000-ema-pruned", "clip_skip": 2,
                                  "hires": {"scale": 1.5, "upscaler": "latent", "steps": 12, "denoise": 0.45}})
        await pilot.pause(0.3)
        generate.query_one("#form").scroll_end(animate=False)
        generate.query_one("#hires-scale").focus()
        await pilot.pause(0.5)
        save("generate-advanced")

    empty = make_app(Path(tempfile.mkdtemp(prefix="darkroom-shots-empty-")), models=[], start_worker=False)
    empty.registry.search_dirs = [Path("~/darkroom/models"), Path("~/ComfyUI/models")]
    app = empty
    async with empty.run_test(size=SIZE, notifications=False) as pilot:
        await wait_for(pilot, lambda: type(empty.screen).__name__ == "NoModelsScreen")
        await wait_for(pilot, lambda: "No models found" in screen_text(empty))
        await pilot.pause(0.2)
        save("no-models")
    return written


def main() -> int:
    for path in asyncio.run(shoot()):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
