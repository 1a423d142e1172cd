"""Shown when no checkpoint is found: which folders were scanned and how to add one."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Button, Static

from core.text import visible
from tui.widgets.footer import StableFooter


def _other_kind_folder(folder: Path) -> tuple[str, Path] | None:
    """(what the folder holds, the models folder above it) when ``folder`` is another kind's folder of a
    ComfyUI or A1111 models folder (``--models-dir ~/ComfyUI/models/loras``): the parent is what was meant."""
    from core.models.registry import KIND_FOLDERS, KIND_LABELS

    checkpoints = {name.lower() for name in KIND_FOLDERS["checkpoint"]}
    for kind, names in KIND_FOLDERS.items():
        if kind != "checkpoint" and folder.name.lower() in {n.lower() for n in names}:
            parent = folder.parent
            if parent.is_dir() and any(p.name.lower() in checkpoints for p in parent.iterdir() if p.is_dir()):
                return KIND_LABELS[kind], parent
    return None


def no_models_text(search_dirs: list[Path], unusable: list[tuple[str, str]] | None = None) -> Text:
    """``unusable``: (name, what it is) of files found in the checkpoint folders that are no checkpoint.
    Lines stay under 74 characters (paths aside), so an 80-column window shows them unwrapped."""
    text = Text()
    text.append("No models found\n\n", style="bold")
    text.append("Darkroom looked for checkpoints (.safetensors, .ckpt) in:\n")
    for folder in search_dirs or []:
        text.append(f"  • {visible(folder)}")
        if not Path(folder).is_dir():  # a typo in --models-dir is the likeliest cause: say so beside it
            text.append("  (no such folder: check the path)", style="bold")
        text.append("\n")
    if not search_dirs:
        text.append("  (no folders configured)\n")
    for folder in search_dirs or []:
        other = _other_kind_folder(Path(folder))
        if other is not None:
            text.append(f"\nThat is the {other[0]} folder; restart with its models folder:\n", style="bold")
            text.append(f"  darkroom --models-dir {visible(other[1])}\n", style="bold")
    if unusable:
        text.append("\nFound there, but none is a checkpoint Darkroom can use:\n")
        for name, what in unusable[:8]:
            text.append(f"  • {visible(name)}: {visible(what)}\n")
        if len(unusable) > 8:
            text.append(f"  … and {len(unusable) - 8} more\n")
    example = Path(search_dirs[0] if search_dirs else "models") / "v1-5-pruned-emaonly.safetensors"
    text.append(
        "\nTo add a model, do one of these, then press R to rescan:\n"
        "  • copy or link a checkpoint into a folder above, for example\n"
        f"      {visible(example)}\n"
        "  • or restart with --models-dir at a ComfyUI or A1111 models folder:\n"
        "      darkroom --models-dir ~/ComfyUI/models\n"
        "      darkroom --models-dir ~/stable-diffusion-webui/models\n"
    )
    text.append("You can still browse the queue and history (Escape).", style="dim")
    return text


class NoModelsScreen(Screen):
    BINDINGS = [
        Binding("r", "rescan", "Rescan"),
        Binding("escape", "dismiss_screen", "Browse anyway"),
        Binding("ctrl+q", "app.quit", "Quit", priority=True),
    ]
    DEFAULT_CSS = """
    NoModelsScreen { align: center middle; }
    NoModelsScreen #no-models-box { width: 100; max-width: 100%; height: auto; max-height: 100%; border: thick $warning; padding: 0 2; }
    NoModelsScreen .actions { height: auto; margin: 1 0 0 0; }
    """

    def __init__(self, search_dirs: list[Path], unusable: list[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self.search_dirs = [Path(p) for p in search_dirs]
        self.unusable = list(unusable or [])

    def compose(self) -> ComposeResult:
        with Vertical(id="no-models-box"):
            yield Static(no_models_text(self.search_dirs, self.unusable), id="no-models-text")
            with Vertical(classes="actions"):
                yield Button("Rescan (R)", variant="primary", id="rescan", compact=True)
        yield StableFooter()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "rescan":
            self.action_rescan()

    def action_rescan(self) -> None:
        from tui.screens.generate import GenerateScreen

        self.dismiss()
        screen = self.app.get_generate_screen()
        if isinstance(screen, GenerateScreen):
            screen.load_models(rescan=True)

    def action_dismiss_screen(self) -> None:
        self.dismiss()
