"""The LoRA / embedding picker (Ctrl+N on the Generate screen): the LoRAs and textual-inversion embeddings
found in the model folders, filtered as you type; Enter inserts ``<lora:name:1>`` or the embedding's name into
the prompt (A1111's "extra networks" cards, as text)."""

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

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self.registry = registry
        self.entries: list[tuple[str, str, str]] = []  # (kind "LoRA" / "embedding", name, text to insert)

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
        """The folder scan runs off the UI thread (a large loras folder on a network drive takes a while)."""
        entries: list[tuple[str, str, str]] = []
        for kind, listing, insert in (("LoRA", "loras", lora_tag), ("embedding", "embeddings", embedding_word)):
            files = getattr(self.registry, listing, None)
            for model in (files() if files is not None else []):
                entries.append((kind, model.name, insert(model.name)))
        self.app.call_from_thread(self._show, entries)

    def _show(self, entries: list[tuple[str, str, str]]) -> None:
        if not self.is_attached:
            return
        self.entries = entries
        loras = sum(kind == "LoRA" for kind, _, _ in entries)
        note = f"{loras} LoRA{'s' * (loras != 1)}, {len(entries) - loras} embedding{'s' * (len(entries) - loras != 1)}"
        self.query_one("#networks-note", Label).update(note if entries else "no LoRAs or embeddings found "
                                                       "(models/loras, models/embeddings)")
        self._fill(self.query_one("#networks-filter", Input).value)

    def _fill(self, needle: str) -> None:
        options = self.query_one("#networks-list", OptionList)
        options.clear_options()
        needle = needle.strip().lower()
        for index, (kind, name, _) in enumerate(self.entries):
            if needle and needle not in name.lower():
                continue
            label = Text(visible(name))  # file names: never markup, control characters made visible
            label.append(f"  {kind}", style="dim")
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
