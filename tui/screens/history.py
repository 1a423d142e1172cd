"""History screen: finished images, newest first, with a thumbnail, the full parameters and actions."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Static

from core.events import Event, ImageSaved, JobFinished
from core.metadata import with_made_with
from core.request import GenerationRequest
from core.sampling import SAMPLER_LABELS, SCHEDULE_LABELS
from core.text import visible
from tui.screens.base import MainScreen
from tui.screens.dialogs import ConfirmScreen
from tui.widgets.image import chosen_image_class, make_image
from tui.widgets.safe_input import Input


def format_time(stamp: Any, short: bool = False) -> str:
    """``2026-12-02 04:31:07``; ``short``: ``12-02 04:31`` (an 80-column list leaves the prompt room)."""
    if isinstance(stamp, int | float):
        return time.strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    text = str(stamp or "")[:19]
    return text[5:16] if short and len(text) == 19 else text


def field(row: Any, name: str, default: Any = None) -> Any:
    if isinstance(row, dict):
        return row.get(name, default)
    return getattr(row, name, default)


def row_request(row: Any) -> GenerationRequest:
    """The entry's request, saying the entry's own model hash (a job made from another image carries that
    image's, which its job's model check must not compare with: this image was made with the local file)."""
    request = field(row, "request")
    request = request if isinstance(request, GenerationRequest) else GenerationRequest.from_dict(request)
    return with_made_with(request, field(row, "model_hash"))


def _grid_id(row: Any) -> str | None:
    """The X/Y/Z grid a history row's image is a cell of (``core.grid``), or None."""
    try:
        grid = row_request(row).extra.get("grid")
    except Exception:  # noqa: BLE001 - a bad stored row is no grid cell
        return None
    return str(grid["id"]) if isinstance(grid, dict) and "id" in grid else None


def _is_grid_image(row: Any) -> bool:
    """The row is an X/Y/Z grid's labelled image (``core.grid.save_grid``, recorded with no job), not one of its
    cells (nor an image a job re-made from it: History's "again" queues its request)."""
    if field(row, "job_id") is not None:
        return False
    try:
        return row_request(row).extra.get("grid", {}).get("image") is True
    except Exception:  # noqa: BLE001
        return False


def describe(row: Any, families: dict[str, str] | None = None) -> Text:
    """Every parameter as plain text (prompts may contain [ ] and ( ): never markup; control characters in
    them, in file names and values from the database or a PNG, made visible). ``families`` (model name ->
    family label, from the Generate screen's model scan) adds the model's family under it."""
    request = row_request(row)
    text = Text()
    text.append("Prompt\n", style="bold")
    text.append(visible(request.prompt, multiline=True) + "\n")
    if request.negative_prompt:
        text.append("Negative prompt\n", style="bold")
        text.append(visible(request.negative_prompt, multiline=True) + "\n")
    text.append("\n")
    data = request.to_dict()
    data["seed"] = field(row, "seed", request.seed)
    inpainting = ("mask", "mask_blur", "inpaint_area", "only_masked_padding", "masked_content", "invert_mask",
                  "outpaint") if request.is_inpaint else ()
    for name in ("model", "sampler", "schedule", "steps", "cfg", "seed", "width", "height", "batch_size",
                 "batch_count", "clip_skip", "vae", "denoise", "init_image", *inpainting, "hires", "upscale"):
        value = data.get(name)
        if value is None:
            continue
        if name == "outpaint":  # "left 64, right 0, top 0, bottom 0"
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif name in ("sampler", "schedule"):  # "DPM++ 2M (dpmpp_2m)": the form's label, the jobs file's name
            label = (SAMPLER_LABELS if name == "sampler" else SCHEDULE_LABELS).get(value, value)
            value = f"{label} ({value})" if label != value else value
        text.append(f"{name}: ", style="bold")
        text.append(f"{visible(value)}\n")
        if name == "model" and families and families.get(value):
            text.append("family: ", style="bold")
            text.append(f"{visible(families[value])}\n")
    if request.detailer:
        from core.detailer_args import summary

        text.append("detailer: ", style="bold")
        text.append(f"{visible(summary(request.detailer))}\n")
    if field(row, "model_hash"):
        text.append("model hash: ", style="bold")
        text.append(f"{visible(field(row, 'model_hash'))}\n")
    timings = field(row, "timings") or {}
    if timings:
        text.append("timings: ", style="bold")
        text.append(visible(", ".join(f"{k} {v:.2f}s" if isinstance(v, int | float) else f"{k} {v}"
                                      for k, v in dict(timings).items())) + "\n")
    text.append("created: ", style="bold")
    text.append(f"{visible(format_time(field(row, 'created')))}\n")
    text.append("file: ", style="bold")
    text.append(f"{visible(field(row, 'path', ''))}\n")
    return text


class HistoryScreen(MainScreen):
    MODE = "history"
    AUTO_FOCUS = "#history-table"
    BINDINGS = [
        Binding("slash", "focus_search", "Search"),
        # From the search box (which does not use these keys) back to the list.
        Binding("down,escape", "focus_list", "List", show=False),
        Binding("g", "again", "Again"),
        Binding("n", "again_new_seed", "New seed"),
        Binding("l", "load", "Use settings"),
        # The footer of an 80-column terminal has room for the keys above and Delete; these show from
        # WIDE_FOOTER columns, and answer at any width through their hidden twins
        Binding("c", "copy_prompt", "Copy prompt"),
        Binding("c", "copy_prompt('key')", "Copy prompt", show=False),
        Binding("s", "copy_seed", "Copy seed"),
        Binding("s", "copy_seed('key')", "Copy seed", show=False),
        Binding("o", "show_path", "Path"),
        Binding("o", "show_path('key')", "Path", show=False),
        Binding("u", "upscale", "Upscale"),
        Binding("u", "upscale('key')", "Upscale", show=False),
        Binding("x,delete", "delete", "Delete"),
    ]
    WIDE_ONLY = frozenset({"copy_prompt", "copy_seed", "show_path", "upscale"})
    WIDE_FOOTER = 116  # every key above with the compact spacing, and the palette's ^p (more fill a 120-column line)
    LONG_DATES = 100  # from here the list's date is the long form
    DEFAULT_CSS = """
    HistoryScreen #history-body { height: 1fr; }
    HistoryScreen #history-left { width: 1fr; }
    HistoryScreen #history-table { height: 1fr; }
    HistoryScreen #history-right { width: 1fr; border: round $secondary; }
    HistoryScreen #thumb-box { height: 18; align: center middle; }
    HistoryScreen.-short #thumb-box { height: 9; }  /* leaves the parameters room in an 80x24 window */
    HistoryScreen #thumb { width: 1fr; height: 1fr; }
    HistoryScreen #thumb.textual-image { width: auto; height: auto; }
    HistoryScreen #details { height: 1fr; padding: 0 1; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, Any] = {}
        self.search = ""
        self.open_grids: set[str] = set()  # X/Y/Z grids shown as their cells (Enter on the grid's entry)
        self._shown: list[tuple[str, Any, int]] = []  # (key, row id, cells) of each entry drawn
        self._refresh_queued = False  # a refresh for new images waits in the app's queue (_refresh_soon)
        self._narrow_list: bool | None = None  # the created column's short form (below LONG_DATES columns)

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="history-body"):
            with Vertical(id="history-left"):
                yield Input(placeholder="search prompts, seeds, file names (/)", id="history-search")
                yield DataTable(id="history-table", cursor_type="row", zebra_stripes=True)
            with Vertical(id="history-right"):
                with Vertical(id="thumb-box"):
                    thumb = make_image(getattr(self.app, "image_class", None) or chosen_image_class(), None,
                                       id="thumb")
                    thumb.display = False
                    yield thumb
                with VerticalScroll(id="details"):
                    yield Static("No image selected.", id="details-text")

    def on_mount(self) -> None:
        if self.quitting():  # built in the background (DarkroomApp._prebuild_next_screen) as the app quits
            return
        table = self.query_one("#history-table", DataTable)
        table.add_column("created", key="created")
        table.add_column("seed", key="seed")
        table.add_column("prompt", key="prompt")
        self.app.job_events.subscribe(self, self._on_job_event)
        self.refresh_history()
        self.apply_pending_search()

    def on_screen_resume(self) -> None:
        # Kept current by the job events while hidden: the new frame paints first, then the history is read
        # again (images another process added).
        self.call_after_refresh(self.refresh_history)
        self.apply_pending_search()

    def on_resize(self, event: events.Resize) -> None:
        if (event.size.width < self.LONG_DATES) != self._narrow_list and self.rows:
            self.refresh_history()  # the created column's long or short form

    def apply_pending_search(self) -> None:
        query = getattr(self.app, "pending_history_search", None)
        if query is not None:
            self.app.pending_history_search = None
            self.query_one("#history-search", Input).value = query

    def _on_job_event(self, event: Event) -> None:
        # each image is listed as soon as it is saved (an earlier run's, retried, is listed already)
        if (isinstance(event, ImageSaved) and not event.earlier) or isinstance(event, JobFinished):
            self._refresh_soon()

    def _refresh_soon(self) -> None:
        """One history read for the images saved together (a batch of batch_size, a burst of events): it runs
        after the events already queued, which find it queued."""
        if not self._refresh_queued:
            self._refresh_queued = True
            self.app.call_later(self._queued_refresh)

    def _queued_refresh(self) -> None:
        self._refresh_queued = False
        if not self.quitting():  # the app may have begun to exit meanwhile
            self.refresh_history()

    @on(Input.Changed, "#history-search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.search = event.value
        self.refresh_history()

    @on(Input.Submitted, "#history-search")
    def _search_submitted(self) -> None:
        self.query_one("#history-table", DataTable).focus()

    def refresh_history(self) -> None:
        table = self.query_one("#history-table", DataTable)
        try:
            rows = self.app.store.history(search=self.search or None, limit=200)
        except Exception as error:  # noqa: BLE001
            self.app.notify(f"Could not read the history: {error}", severity="error", markup=False)
            return
        entries = self._entries(rows)
        # a grid's entry changes with its cell count and its image while its key stays
        shown = [(key, field(row, "id"), cells) for key, (row, cells) in entries.items()]
        narrow = self.app.size.width < self.LONG_DATES
        if rows and shown == self._shown and table.row_count == len(entries) and narrow == self._narrow_list:
            return  # nothing added or removed: the table, selection and thumbnail stay as drawn
        selected = self.selected_key()
        # On the newest entry (or none yet), the cursor follows new images in as they arrive, as a log's tail
        # does; on an older one it stays on that image.
        follow_newest = selected is None or not self._shown or selected == self._shown[0][0]
        table.clear()
        self.rows = {}
        self._shown = shown
        self._narrow_list = narrow
        for key, (row, cells) in entries.items():
            self.rows[key] = row
            try:
                prompt = " ".join(visible(row_request(row).prompt).split())[:70]
            except Exception:  # noqa: BLE001 - a bad stored row still lists
                prompt = "(unreadable request)"
            created = format_time(field(row, "created"), short=narrow)
            seed = visible(field(row, "seed", ""))
            if cells:
                seed, prompt = f"{cells} cells", f"▸ X/Y/Z grid: {prompt}"
            table.add_row(Text(visible(created)), Text(seed), Text(prompt), key=key)
        if selected in self.rows and not follow_newest:
            table.move_cursor(row=table.get_row_index(selected))
        self.show_selected()

    def _entries(self, rows: list[Any]) -> dict[str, tuple[Any, int]]:
        """Table key -> (row, cells): the cells of an X/Y/Z grid (``extra["grid"]``) are one entry, keyed
        ``grid:<id>`` and shown by its grid image once saved (else its newest cell), unless the grid is open;
        other rows are their own."""
        grids: dict[str, int] = {}
        images: dict[str, Any] = {}
        for row in rows:
            if (grid := _grid_id(row)) is not None:
                if _is_grid_image(row):
                    images.setdefault(grid, row)
                else:
                    grids[grid] = grids.get(grid, 0) + 1
        entries: dict[str, tuple[Any, int]] = {}
        for row in rows:
            grid = _grid_id(row)
            if grid is not None and (grids.get(grid, 0) > 1 or grid in images) and grid not in self.open_grids:
                entries.setdefault(f"grid:{grid}", (images.get(grid, row), max(grids.get(grid, 0), 1)))
            else:
                entries[str(field(row, "id"))] = (row, 0)
        return entries

    @on(DataTable.RowSelected, "#history-table")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a grid's entry opens it into its cells; Enter on an open grid's cell closes it again."""
        key = event.row_key.value or ""
        row = self.rows.get(key)
        grid = key[5:] if key.startswith("grid:") else (_grid_id(row) if row is not None else None)
        if grid is None:
            return
        if grid in self.open_grids:
            self.open_grids.discard(grid)
        else:
            self.open_grids.add(grid)
        self.refresh_history()

    def selected_key(self) -> str | None:
        table = self.query_one("#history-table", DataTable)
        if table.row_count == 0:
            return None
        try:
            return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001
            return None

    def selected_row(self) -> Any:
        key = self.selected_key()
        return self.rows.get(key) if key is not None else None

    @on(DataTable.RowHighlighted, "#history-table")
    def _row_highlighted(self) -> None:
        self.show_selected()

    def show_selected(self) -> None:
        row = self.selected_row()
        details = self.query_one("#details-text", Static)
        thumb = self.query_one("#thumb")
        if row is None:
            details.update("No images yet." if not self.search else "No image matches the search.")
            thumb.display = False
            return
        try:
            details.update(describe(row, getattr(self.app, "model_families", None)))
        except Exception as error:  # noqa: BLE001
            details.update(Text(visible(f"Unreadable row: {error}", multiline=True)))
        self.load_thumbnail(str(field(row, "path", "")), self.selected_key() or "")  # a grid's key too

    @work(thread=True, exclusive=True, group="thumbnail")
    def load_thumbnail(self, path: str, key: str) -> None:
        from tui.widgets.image import load_rgb_thumbnail

        try:
            thumb = load_rgb_thumbnail(path, 512)
        except OSError:
            thumb = None
        self.call_from_worker_thread(self._thumbnail_ready, thumb, key)

    def _thumbnail_ready(self, image: Any, key: str) -> None:
        if key != self.selected_key():
            return
        thumb = self.query_one("#thumb")
        thumb.image = image
        thumb.display = image is not None

    # ---- actions -------------------------------------------------------------------------------------------

    def _with_row(self) -> Any:
        row = self.selected_row()
        if row is None:
            self.app.notify("Select an image first.", severity="warning")
        return row

    def action_focus_search(self) -> None:
        self.query_one("#history-search", Input).focus()

    def action_focus_list(self) -> None:
        self.query_one("#history-table").focus()

    def action_again(self) -> None:
        """Same request, same seed, one image: reproduces this picture."""
        row = self._with_row()
        if row is not None:
            request = row_request(row).replace(seed=int(field(row, "seed")), batch_size=1, batch_count=1)
            self.app.submit(request)

    def action_again_new_seed(self) -> None:
        row = self._with_row()
        if row is not None:
            self.app.submit(row_request(row).replace(seed=-1, batch_size=1, batch_count=1))

    def action_load(self) -> None:
        """Use these settings: fill the Generate form from the image's own parameters (what its PNG says, as
        A1111's PNG Info), or from the history entry when the file cannot be read; say what was filled."""
        row = self._with_row()
        if row is not None:
            self.read_image_settings(row)

    @work(thread=True, exclusive=True, group="use-settings")
    def read_image_settings(self, row: Any) -> None:
        from core.metadata import read_request
        from tui.png_settings import NO_MODEL

        path = Path(str(field(row, "path", "")))
        note = None
        try:
            request = read_request(path, model_fallback=NO_MODEL)
        except Exception as error:  # noqa: BLE001 - moved, deleted, stripped of metadata, unreadable
            try:
                request = row_request(row)
                request = request.replace(seed=int(field(row, "seed", request.seed)))
            except Exception as row_error:  # noqa: BLE001
                self.app.call_from_thread(self.app.notify, f"Cannot use these settings: {error}; and the history "
                                          f"entry is unreadable: {row_error}", severity="error", markup=False)
                return
            note = f"the image's own parameters could not be read ({error}): the history entry was used"
        self.call_from_worker_thread(self._use_settings, request, path.name, note)

    def _use_settings(self, request: GenerationRequest, source: str, note: str | None) -> None:
        screen = self.app.get_generate_screen()
        if screen is None:  # not mounted yet: its settings fill the form when it is
            self.app.load_into_generate({**request.to_dict(), "seed_lock": True})
            return
        self.app.switch_mode("generate")
        screen.apply_image_request(request, source, note)

    def action_upscale(self, _key: str = "") -> None:
        """Upscale this image with an upscaler model (A1111's Extras tab): asks which one (the models in
        upscale_models / ESRGAN / RealESRGAN), then queues an upscale job that carries the image's parameters."""
        row = self._with_row()
        if row is not None:
            self.list_upscalers(row)

    @work(thread=True, exclusive=True, group="upscalers")
    def list_upscalers(self, row: Any) -> None:
        registry = self.app.registry
        try:
            names = [m.name for m in registry.upscalers()] if hasattr(registry, "upscalers") else []
        except Exception as error:  # noqa: BLE001 - an unreadable models folder: said, never raised
            self.app.call_from_thread(self.app.notify, f"Cannot list the upscalers: {error}", severity="error",
                                      markup=False)
            return
        # the folder of this models folder's layout (ComfyUI upscale_models, A1111 ESRGAN), said in full
        where = "models/upscale_models or models/ESRGAN"
        if not names and hasattr(registry, "suggested_dir"):
            with contextlib.suppress(Exception):  # no models folder on disk: the general names
                where = visible(str(registry.suggested_dir("upscaler")))
        self.call_from_worker_thread(self._ask_upscaler, row, names, where)

    def _ask_upscaler(self, row: Any, names: list[str], where: str = "") -> None:
        from core.request import Upscale
        from tui.screens.dialogs import TextPromptScreen

        if not names:
            self.app.notify("No upscaler models found: put ESRGAN, Real-ESRGAN, SwinIR, DAT or HAT files "
                            f"(.safetensors, .pth) in {where}", severity="warning", markup=False)
            return
        path = Path(str(field(row, "path", "")))
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        question = f"Upscale {path.name} with which upscaler model?\n({shown})"

        def chosen(answer: str | None) -> None:
            if not answer:
                return
            if answer not in names:
                try:
                    self.app.registry.find_upscaler(answer)  # a close match or a path; else says what there is
                except Exception as error:  # noqa: BLE001 - ModelNotFoundError: its message is the answer
                    self.app.notify(str(error), severity="error", markup=False)
                    return
            try:
                request = row_request(row).replace(seed=int(field(row, "seed")), batch_size=1, batch_count=1,
                                                   upscale=Upscale(answer, image=str(path)))
            except Exception as error:  # noqa: BLE001 - a stored row that is no longer a valid request
                self.app.notify(f"Cannot upscale this image: {error}", severity="error", markup=False)
                return
            self.app.submit(request)

        self.app.push_screen(TextPromptScreen(question, names[0]), chosen)

    def action_copy_prompt(self, _key: str = "") -> None:
        row = self._with_row()
        if row is not None:
            self.app.copy_to_clipboard(row_request(row).prompt)
            self.app.notify("Prompt copied to the clipboard", timeout=2)

    def action_copy_seed(self, _key: str = "") -> None:
        row = self._with_row()
        if row is not None:
            self.app.copy_to_clipboard(str(field(row, "seed")))
            self.app.notify(f"Seed {field(row, 'seed')} copied to the clipboard", timeout=2)

    def action_show_path(self, _key: str = "") -> None:
        # shown and copied: a notification's text cannot be selected, and the path is what a user pastes into
        # a file manager, an image viewer or a --batch jobs file
        row = self._with_row()
        if row is not None:
            path = str(field(row, "path"))
            self.app.copy_to_clipboard(path)
            self.app.notify(path, title="File (path copied to the clipboard)", markup=False, timeout=10)

    def action_delete(self) -> None:
        row = self._with_row()
        if row is None:
            return
        path = Path(str(field(row, "path")))

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.delete_row(row)

        self.app.push_screen(ConfirmScreen(f"Delete {path}?\nThe file and its history entry are removed."),
                             confirmed)

    def delete_row(self, row: Any) -> None:
        path = Path(str(field(row, "path")))
        try:
            path.unlink(missing_ok=True)
            self.app.store.delete_history(field(row, "id"))
        except Exception as error:  # noqa: BLE001
            self.app.notify(f"Could not delete {path}: {error}", severity="error", markup=False)
        else:
            self.app.notify(f"Deleted {path.name}", markup=False, timeout=2)
        self.refresh_history()
