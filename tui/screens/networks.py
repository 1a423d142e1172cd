"""The LoRA / embedding picker (Ctrl+N on the Generate screen): the LoRAs and textual-inversion embeddings
found in the model folders, filtered as you type; Enter inserts ``<lora:name:1>`` or the embedding's name into
the prompt (A1111's "extra networks" cards, as text). LoRAs made for another family than the chosen model's
(their keys say which, ``core.lora.detect``) are listed last, dimmed, with the family they are for."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from core.presets import family_label
from core.text import visible
from tui.widgets.safe_input import Input


def lora_tag(name: str, weight: float = 1.0) -> str:
    """The prompt tag of a LoRA by its registry name (its file stem: what A1111 writes)."""
    return f"<lora:{name.rsplit('/', 1)[-1]}:{weight:g}>"


def embedding_word(name: str) -> str:
    """The word that calls an embedding in the prompt: its file stem."""
    return name.rsplit("/", 1)[-1]


class NetworksScreen(ModalScreen[str | None]):
    """Returns the text to insert into the prompt, or None when cancelled."""

    CSS_PATH = "networks.tcss"
    BINDINGS = [("escape", "dismiss(None)", "Cancel"),
                # from the filter box (the list's own keys win while it has focus)
                Binding("down", "move(1)", show=False), Binding("up", "move(-1)", show=False)]
    AUTO_FOCUS = "#networks-filter"

    def __init__(self, registry: Any, family: str | None = None) -> None:
        super().__init__()
        self.registry = registry
        self.family = family  # the chosen model's (None: not known, nothing is set apart)
        # (kind "LoRA" / "embedding", name, text to insert, the other family a LoRA is for or None)
        self.entries: list[tuple[str, str, str, str | None]] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="networks-dialog"):
            yield Label("LoRAs and embeddings (type to filter, Enter inserts into the prompt)", id="networks-title")
            yield Input(placeholder="filter", id="networks-filter")
            yield OptionList(id="networks-list")
            yield Label("scanning the model folders…", id="networks-note", classes="hint")

    def on_mount(self) -> None:
        self.scan()

    @work(thread=True, exclusive=True, group="networks-scan")
    def scan(self) -> None:
        """The folder scan and the LoRA headers run off the UI thread (a large loras folder on a network drive
        takes a while; each header is read once per file change, ``ModelRegistry.inspect``)."""
        entries: list[tuple[str, str, str, str | None]] = []
        for kind, listing, insert in (("LoRA", "loras", lora_tag), ("embedding", "embeddings", embedding_word)):
            files = getattr(self.registry, listing, None)
            for model in (files() if files is not None else []):
                entries.append((kind, model.name, insert(model.name), self._other_family(kind, model)))
        entries.sort(key=lambda entry: entry[3] is not None)  # the usable ones first, each group in its order
        self.app.call_from_thread(self._show, entries)

    def _other_family(self, kind: str, model: Any) -> str | None:
        """The family a LoRA is for when its keys say so and it is not the chosen model's; else None."""
        inspect = getattr(self.registry, "inspect", None)
        if kind != "LoRA" or self.family is None or inspect is None:
            return None
        base = getattr(inspect(model), "base", None)
        return base if base is not None and base != self.family else None

    def _show(self, entries: list[tuple[str, str, str, str | None]]) -> None:
        if not self.is_attached:
            return
        self.entries = entries
        loras = sum(kind == "LoRA" for kind, *_ in entries)
        others = sum(other is not None for *_, other in entries)
        note = f"{loras} LoRA{'s' * (loras != 1)}, {len(entries) - loras} embedding{'s' * (len(entries) - loras != 1)}"
        if others:
            note += f" ({others} for other model families, listed last)"
        self.query_one("#networks-note", Label).update(note if entries else "no LoRAs or embeddings found "
                                                       "(models/loras, models/embeddings)")
        self._fill(self.query_one("#networks-filter", Input).value)

    def _fill(self, needle: str) -> None:
        options = self.query_one("#networks-list", OptionList)
        options.clear_options()
        needle = needle.strip().lower()
        for index, (kind, name, _, other) in enumerate(self.entries):
            if needle and needle not in name.lower():
                continue
            # file names: never markup, control characters made visible
            label = Text(visible(name), style="dim" if other else "")
            label.append(f"  {kind}" + (f" for {family_label(other)}" if other else ""), style="dim")
            options.add_option(Option(label, id=str(index)))
        if options.option_count:
            options.highlighted = 0

    @on(Input.Changed, "#networks-filter")
    def _filter(self, event: Input.Changed) -> None:
        self._fill(event.value)

    @on(Input.Submitted, "#networks-filter")
    def _submit_filter(self, event: Input.Submitted) -> None:
        event.stop()
        options = self.query_one("#networks-list", OptionList)
        if options.highlighted is not None:
            self._choose(options.get_option_at_index(options.highlighted).id)

    @on(OptionList.OptionSelected, "#networks-list")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self._choose(event.option.id)

    def _choose(self, option_id: str | None) -> None:
        if option_id is not None:
            self.dismiss(self.entries[int(option_id)][2])

    def action_move(self, step: int) -> None:
        options = self.query_one("#networks-list", OptionList)
        options.action_cursor_down() if step > 0 else options.action_cursor_up()
