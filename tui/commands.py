"""Command palette provider: presets, models and history search."""

from __future__ import annotations

from functools import partial
from typing import Any

from rich.text import Text
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.markup import escape

from core.text import visible


class DarkroomCommands(Provider):
    def _commands(self, query: str) -> list[tuple[str, Any, str]]:
        app: Any = self.app
        commands: list[tuple[str, Any, str]] = []
        generate = app.get_generate_screen() if hasattr(app, "get_generate_screen") else None
        if generate is not None and generate.is_mounted:
            commands.append(("Open PNG: fill Generate from an image's parameters", self._open_png,
                             "A1111, Forge or Darkroom image (Ctrl+O on Generate)"))
            commands.append(("X/Y/Z grid: queue every combination of up to three fields", self._grid,
                             "the form's job over lists of seeds, steps, CFG, samplers, models... (Ctrl+G)"))
            for preset in generate.fitting_presets():  # the ones that suit the chosen model's family
                commands.append((f"Preset: {visible(preset.name)}", partial(self._apply_preset, preset),
                                 visible(preset.description or "apply to Generate")))
            # a model copied in (or re-downloaded) while Darkroom runs: only the no-models screen rescanned
            commands.append(("Models: rescan the models folders", partial(generate.load_models, rescan=True),
                             "find checkpoints, VAEs, LoRAs and upscalers added or changed since the start"))
            for model in generate.models:
                commands.append((f"Model: {visible(model.name)}",
                                 partial(self._choose_model, str(model.name)),
                                 _model_help(generate.model_infos.get(str(model.name)))))
        enhancing = app.settings.get("enhance_prompts") is True
        commands.append((f"Prompt enhancement: turn {'off' if enhancing else 'on'}", self._toggle_enhance,
                         "a local Ollama-compatible LLM rewrites each prompt before it is queued"))
        if query.strip():
            commands.append((f"History: search {visible(query.strip())}",
                             partial(self._search_history, query.strip()), "show matching images"))
        return commands

    async def discover(self) -> Hits:
        for title, callback, help_text in self._commands(""):
            yield DiscoveryHit(Text(title), callback, help=escape(help_text))

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, callback, help_text in self._commands(query):
            score = 1.0 if title.startswith("History: search") else matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(escape(title)), callback, text=title, help=escape(help_text))

    def _toggle_enhance(self) -> None:
        from core.enhance import EnhanceSettings

        app: Any = self.app
        app.settings["enhance_prompts"] = on = app.settings.get("enhance_prompts") is not True
        app.save_form_settings()
        settings = EnhanceSettings.from_env(app.settings.get("enhance_url"), app.settings.get("enhance_model"))
        where = f"model {settings.model} at {settings.url} (settings: enhance_url, enhance_model)"
        app.notify(f"Prompt enhancement {'on: ' + where if on else 'off'}", markup=False, timeout=6)

    def _apply_preset(self, preset: Any) -> None:
        app: Any = self.app
        app.switch_mode("generate")
        app.get_generate_screen().apply_preset(preset)

    def _open_png(self) -> None:
        app: Any = self.app
        app.switch_mode("generate")
        app.get_generate_screen().action_open_png()

    def _grid(self) -> None:
        app: Any = self.app
        app.switch_mode("generate")
        app.get_generate_screen().action_grid()

    def _choose_model(self, name: str) -> None:
        app: Any = self.app
        app.load_into_generate({"model": name})

    def _search_history(self, query: str) -> None:
        app: Any = self.app
        app.pending_history_search = query  # picked up by the History screen when it mounts or resumes
        if app.current_mode == "history":
            app.screen.apply_pending_search()
        else:
            app.switch_mode("history")


def _model_help(info: Any) -> str:
    """The palette's line under a model: its family, or what is wrong with the file ("use this unreadable
    checkpoint" offered a cut-off download as if it would work)."""
    if info is None:
        return "use this checkpoint"
    if info.is_family:
        return f"use this {visible(info.label)} checkpoint"
    if info.label == "not inspected":  # a .ckpt: fine, but its family shows only when it loads
        return "use this checkpoint (a .ckpt: its family shows when it loads)"
    if info.problem:
        return visible(f"{info.label}: {info.problem}")
    return visible(f"{info.label}, not a checkpoint")
