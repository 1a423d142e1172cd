"""Presets screen: built-in and user presets with their values; apply, save current, rename, delete."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, DataTable, Label, OptionList, Static
from textual.widgets.option_list import Option

from core.text import visible
from tui.screens.base import MainScreen
from tui.screens.dialogs import ConfirmScreen, TextPromptScreen
from tui.screens.generate import DEFAULTS, UI_ONLY_FIELDS, notify_preset_problems, presets_module
from tui.screens.save_preset import SavePresetScreen, shown_value


def family_label(family: str) -> str:
    """The family's label; an unknown name (a preset file's) with its control characters made visible."""
    from core.presets import family_label as label

    return visible(label(family))


class PresetsScreen(MainScreen):
    MODE = "presets"
    AUTO_FOCUS = "#preset-list"
    BINDINGS = [
        Binding("a", "apply", "Apply"),
        Binding("s", "save_current", "Save current"),
        Binding("r", "rename", "Rename"),
        Binding("x,delete", "delete", "Delete"),
    ]
    DEFAULT_CSS = """
    PresetsScreen #presets-body { height: 1fr; }
    PresetsScreen #preset-left { width: 40%; min-width: 26; max-width: 40; }
    PresetsScreen #preset-list { height: 1fr; }
    PresetsScreen #preset-detail { width: 1fr; border: round $secondary; padding: 0 1; }
    PresetsScreen #preset-fields { height: 1fr; }
    PresetsScreen #preset-description { height: auto; margin: 0 0 1 0; }
    PresetsScreen #preset-problems { height: auto; max-height: 8; color: $warning; }
    PresetsScreen.-short #preset-problems { max-height: 4; }  /* an 80x24 window keeps room for the values */
    """

    def __init__(self) -> None:
        super().__init__()
        self.presets: list[Any] = []  # the presets listed: those that fit the Generate form's model
        self.all_presets: list[Any] = []
        self.problems: list[str] = []  # the preset files that could not be loaded, and why
        self._listed_family: str | None = None  # the family the list was last built for

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="presets-body"):
            with Vertical(id="preset-left", classes="narrow"):
                yield Label("Presets", id="presets-title", classes="pane-title")
                yield OptionList(id="preset-list")
            with Vertical(id="preset-detail"):
                yield Static("", id="preset-description")
                yield DataTable(id="preset-fields", cursor_type="none", show_cursor=False)
                problems = VerticalScroll(id="preset-problems")  # files in the presets folder that are no preset
                problems.display = False
                with problems:
                    yield Static("", id="preset-problems-text")
                with Horizontal(classes="actions"):
                    # One-line buttons without key hints (the footer names the keys): they fit 80 columns.
                    yield Button("Apply", variant="primary", id="apply", compact=True)
                    yield Button("Save current", id="save", compact=True)
                    yield Button("Rename", id="rename", compact=True)
                    yield Button("Delete", variant="error", id="delete", compact=True)

    def on_mount(self) -> None:
        if self.quitting():  # built in the background (DarkroomApp._prebuild_next_screen) as the app quits
            return
        table = self.query_one("#preset-fields", DataTable)
        table.add_column("field", key="field")
        table.add_column("value", key="value")
        self.reload()

    @work(thread=True, exclusive=True, group="presets-screen")
    def reload(self, select: str | None = None) -> None:
        try:
            presets, problems = presets_module(self.app).load_presets()
        except Exception as error:  # noqa: BLE001
            presets, problems = [], [f"Could not load presets: {error}"]
        self.call_from_worker_thread(self._loaded, presets, problems, select)

    def on_screen_resume(self) -> None:
        # The Generate form's model may have changed: list what fits it now. Rebuilding the list costs a
        # frame's worth of work, so only when the family differs from the one listed.
        if self.all_presets and self._model_family() != self._listed_family:
            self._list(None)
        # the folder again, after the first frame: a preset file fixed (or added) in an editor meanwhile
        self.call_after_refresh(self.reload)

    def _loaded(self, presets: list[Any], problems: list[Any], select: str | None) -> None:
        problems = [str(problem) for problem in problems or []]
        if select is None and presets == self.all_presets and problems == self.problems:
            return  # read again on coming back and nothing changed: the list and its selection stay
        self.all_presets = presets
        self.problems = problems
        self._list(select)
        self._show_problems()
        notify_preset_problems(self.app, problems)
        screen = self.app.get_generate_screen()
        if screen is not None and screen.is_mounted:
            screen.reload_presets()

    def _show_problems(self) -> None:
        box = self.query_one("#preset-problems", VerticalScroll)
        box.display = bool(self.problems)
        text = Text(f"Not loaded ({len(self.problems)} file{'s' * (len(self.problems) != 1)}; "
                    "fixed files are read when you come back here):\n", style="bold")
        for problem in self.problems:
            text.append(f"• {visible(problem)}\n")
        self.query_one("#preset-problems-text", Static).update(text)

    def _model_family(self) -> str | None:
        screen = self.app.get_generate_screen()
        if screen is None or not screen.is_mounted:
            return None
        return screen.model_family()

    def _list(self, select: str | None) -> None:
        """List the presets that fit the Generate form's model's family (every preset while it is unknown)."""
        family = self._model_family()
        self._listed_family = family
        presets = [p for p in self.all_presets if family is None or getattr(p, "family", None) in (None, family)]
        hidden = len(self.all_presets) - len(presets)
        title = "Presets"
        if family is not None:
            from tui.screens.generate import family_spec

            title = f"Presets for {family_spec(family).label}" + (f" ({hidden} hidden)" if hidden else "")
        self.query_one("#presets-title", Label).update(title)
        previous = select or (self.selected().name if self.selected() else None)
        self.presets = presets
        option_list = self.query_one(OptionList)
        previous = select or (self.selected().name if self.selected() else None)
        option_list.clear_options()
        for preset in presets:
            label = Text(visible(preset.name))
            label.append("  built-in" if preset.builtin else "  user", style="dim")
            if getattr(preset, "family", None):
                label.append(f" · {family_label(preset.family)}", style="dim")
            option_list.add_option(Option(label, id=preset.name))
        names = [p.name for p in presets]
        if presets:
            option_list.highlighted = names.index(previous) if previous in names else 0
        self.show_selected()

    def selected(self) -> Any:
        option_list = self.query_one(OptionList)
        index = option_list.highlighted
        if index is None or not 0 <= index < len(self.presets):
            return None
        return self.presets[index]

    @on(OptionList.OptionHighlighted)
    def _highlighted(self) -> None:
        self.show_selected()

    @on(OptionList.OptionSelected)
    def _selected(self) -> None:
        self.action_apply()

    def show_selected(self) -> None:
        preset = self.selected()
        table = self.query_one("#preset-fields", DataTable)
        table.clear()
        description = self.query_one("#preset-description", Static)
        if preset is None:
            hidden = len(self.all_presets) - len(self.presets)
            family = self._model_family()
            if hidden and family is not None:
                description.update(f"No presets for {family_label(family)} models yet ({hidden} for other "
                                   "families are hidden). Save the form's settings as one with s.")
            else:
                description.update("No presets.")
            return
        text = Text(visible(preset.name), style="bold")
        kind = "built-in" if preset.builtin else "user"
        text.append(f"  ({kind}: {visible(preset.source)})\n", style="dim")
        text.append(visible(preset.description or "", multiline=True))
        description.update(text)
        for name, value in dict(preset.fields).items():
            table.add_row(Text(visible(name)), Text(shown_value(value)))

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        action = {"apply": self.action_apply, "save": self.action_save_current, "rename": self.action_rename,
                  "delete": self.action_delete}.get(event.button.id or "")
        if action:
            action()

    def action_apply(self) -> None:
        preset = self.selected()
        screen = self.app.get_generate_screen()
        if preset is None or screen is None:
            return
        self.app.switch_mode("generate")
        screen.apply_preset(preset)

    def action_save_current(self) -> None:
        screen = self.app.get_generate_screen()
        if screen is None or not screen.is_mounted:
            self.app.notify("Open the Generate screen first.", severity="warning")
            return
        # A field the form has no widget for (kept from an image or a preset) is offered only when it is not
        # at its default, as the form's "also:" note shows it: a preset of defaults carries nothing
        hidden = screen.hidden_fields
        fields = {k: v for k, v in screen.form_values().items()
                  if k not in UI_ONLY_FIELDS and v not in (None, {}, "")
                  and not (k in hidden and v == DEFAULTS.get(k))}
        # the form's own fields first, in its order, then the kept ones (they had come before prompt and model)
        fields = dict(sorted(fields.items(), key=lambda item: item[0] in hidden))

        def ask(name: str = "", problem: str = "", kept: set[str] | None = None) -> None:
            self.app.push_screen(SavePresetScreen(fields, name, problem, kept), named)

        def named(answer: tuple[str, dict[str, Any]] | None) -> None:
            if not answer:
                return
            name, chosen = answer
            api = presets_module(self.app)
            family = screen.model_family()  # its sizes and steps are that family's
            if family not in api.preset_families():  # a family that takes no presets yet (SD2.x): none
                family = None
            try:
                api.save_user_preset(name, chosen, family=family)
            except Exception as error:  # noqa: BLE001 - asked again, with the name and the ticks so far
                ask(name, str(error), set(chosen))
                return
            self.app.notify(f"Saved preset {name} ({', '.join(chosen)})", markup=False, timeout=4)
            self.reload(select=name)

        ask()

    def _user_preset(self) -> Any:
        preset = self.selected()
        if preset is None:
            return None
        if preset.builtin:
            self.app.notify("Built-in presets cannot be changed; save a copy instead.", severity="warning")
            return None
        return preset

    def action_rename(self) -> None:
        preset = self._user_preset()
        if preset is None:
            return

        def named(name: str | None) -> None:
            if not name or name == preset.name:
                return
            try:
                presets_module(self.app).rename_user_preset(preset.name, name)
            except Exception as error:  # noqa: BLE001
                self.app.notify(str(error), severity="error", markup=False)
                return
            self.reload(select=name)

        self.app.push_screen(TextPromptScreen(f"Rename preset {preset.name} to:", value=preset.name), named)

    def action_delete(self) -> None:
        preset = self._user_preset()
        if preset is None:
            return

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                presets_module(self.app).delete_user_preset(preset.name)
            except Exception as error:  # noqa: BLE001
                self.app.notify(str(error), severity="error", markup=False)
                return
            self.reload()

        self.app.push_screen(ConfirmScreen(f"Delete preset {preset.name}?"), confirmed)
