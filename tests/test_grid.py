"""X/Y/Z grids: cell requests (A1111's Prompt S/R included), the labelled image, and --batch grids whose cells
equal the same jobs run one by one."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from core.errors import RequestError
from core.grid import expand, grid_image, parse_axes
from core.request import GenerationRequest
from core.worker import GeneratedImage
from tests.batch_harness import RecordingRunner, batch_runner


def base(**changes) -> GenerationRequest:
    return GenerationRequest(model="m", prompt="a red cat", negative_prompt="red blur", seed=1, **changes)


def test_cells_run_z_then_y_then_x_with_each_value_applied():
    axes = parse_axes({"x": {"field": "cfg", "values": [5, 7]}, "y": {"field": "prompt_sr", "values": ["red", "blue"]},
                       "z": {"field": "sampler", "values": ["euler", "heun"]}})
    cells = expand(base(), axes, "g1")
    assert len(cells) == 8
    got = [(c.sampler, c.prompt, c.negative_prompt, c.cfg, c.extra["grid"]) for c in cells[:4]]
    assert got == [
        ("euler", "a red cat", "red blur", 5.0, {"id": "g1", "z": 0, "y": 0, "x": 0}),
        ("euler", "a red cat", "red blur", 7.0, {"id": "g1", "z": 0, "y": 0, "x": 1}),
        ("euler", "a blue cat", "blue blur", 5.0, {"id": "g1", "z": 0, "y": 1, "x": 0}),  # S/R: both prompts
        ("euler", "a blue cat", "blue blur", 7.0, {"id": "g1", "z": 0, "y": 1, "x": 1}),
    ]
    assert {c.sampler for c in cells[4:]} == {"heun"}


@pytest.mark.parametrize(("grid", "message"), [
    ({"x": {"field": "prompt_sr", "values": ["green", "blue"]}}, r"grid.x \(prompt_sr\) = 'green' is invalid: text found"),
    ({"x": {"field": "steps", "values": [4, 999]}}, r"grid.x \(steps\) = 999 is invalid: an integer from 1 to 150"),
    ({"x": {"field": "width", "values": [64]}}, r"grid.x.field = 'width' is invalid: one of seed, steps"),
    ({"w": {"field": "cfg", "values": [1]}}, r"grid = 'w' is invalid: an axis name"),
    ({"x": {"field": "cfg", "values": []}}, r"grid.x.values = \[\] is invalid: a non-empty list"),
    ({"x": {"field": "cfg", "values": [1]}, "y": {"field": "cfg", "values": [2]}}, "a different field on each axis"),
])
def test_bad_grids_name_the_axis_and_the_value(grid, message):
    with pytest.raises(RequestError, match=message):
        expand(base(), parse_axes(grid), "g")


def test_grid_image_places_cells_and_draws_labels():
    axes = parse_axes({"x": {"field": "cfg", "values": [5, 7, 9]}, "y": {"field": "seed", "values": [1, 2]}})
    cells = {(i, j, 0): Image.new("RGB", (16, 16), (40 * i, 100 * j, 7)) for i in range(3) for j in range(2)}
    grid, boxes = grid_image(cells, axes)
    for key, image in cells.items():
        assert grid.crop(boxes[key]).tobytes() == image.tobytes()
    top = min(box[1] for box in boxes.values())
    left = min(box[0] for box in boxes.values())
    assert top > 0 and left > 0  # room for the labels
    header = grid.crop((left, 0, grid.width, top))
    assert header.convert("L").getextrema()[0] < 128  # "CFG Scale: 5" etc. drawn in black on white


class ColourRunner(RecordingRunner):
    """An image that depends on the fields a grid varies, so a wrong cell shows."""

    def run(self, job, ctx):
        type(self).seen.append(job.request)
        r = job.request
        colour = (r.seed * 37 % 256, int(r.cfg * 20) % 256, (r.steps * 11 + sum(map(ord, r.prompt))) % 256)
        return [GeneratedImage(Image.new("RGB", (12, 12), colour), r.seed, r) for _ in r.image_seeds()]


def test_batch_grid_cells_equal_the_same_jobs_run_one_by_one(tmp_path, monkeypatch):
    run = batch_runner(tmp_path, monkeypatch, ColourRunner)
    jobs = tmp_path / "grid.toml"
    jobs.write_text('[grid]\nx = {field = "cfg", values = [5, 7]}\ny = {field = "prompt_sr", values = ["cat", "owl"]}\n'
                    '\n[[job]]\nmodel = "fake"\nprompt = "a cat"\nseed = 3\nsteps = 2\n')
    code, out, err = run(str(jobs))
    assert code == 0, err
    paths = out.split()
    assert len(paths) == 5 and "/grids/" in paths[-1]
    grid = Image.open(paths[-1]).convert("RGB")
    one_by_one = tmp_path / "singles.jsonl"  # the same four jobs, no grid
    one_by_one.write_text("".join(json.dumps({"model": "fake", "prompt": p, "seed": 3, "steps": 2, "cfg": c}) + "\n"
                                  for p, c in (("a cat", 5), ("a cat", 7), ("a owl", 5), ("a owl", 7))))
    code, out_singles, err_singles = run(str(one_by_one))
    assert code == 0, err_singles
    singles = [Image.open(path).convert("RGB") for path in out_singles.split()]
    assert len(singles) == 4 and len({s.tobytes() for s in singles}) == 4
    axes = parse_axes({"x": {"field": "cfg", "values": [5, 7]}, "y": {"field": "prompt_sr", "values": ["cat", "owl"]}})
    _, boxes = grid_image({(i, j, 0): singles[2 * j + i] for i in range(2) for j in range(2)}, axes)
    for j in range(2):
        for i in range(2):
            single = singles[2 * j + i]
            assert Image.open(paths[2 * j + i]).convert("RGB").tobytes() == single.tobytes()  # the cell's image
            assert grid.crop(boxes[(i, j, 0)]).tobytes() == single.tobytes()  # and its place in the grid


def test_a_job_turns_the_grid_off_and_bad_grids_stop_the_run(tmp_path, monkeypatch):
    run = batch_runner(tmp_path, monkeypatch, ColourRunner)
    jobs = tmp_path / "grid.toml"
    jobs.write_text('[grid]\nx = {field = "seed", values = [1, 2, 3]}\n\n[[job]]\nmodel = "fake"\nprompt = "a"\n'
                    'steps = 1\ngrid = false\n\n[[job]]\nmodel = "fake"\nprompt = "b"\nsteps = 1\n'
                    'grid = {x = {field = "steps", values = [0]}}\n')
    code, out, err = run(str(jobs))
    assert code == 2 and "job 2: grid.x (steps) = 0 is invalid" in err and not ColourRunner.seen


@pytest.mark.parametrize(("field", "text", "values"), [
    ("steps", "1-5", [1, 2, 3, 4, 5]),
    ("steps", "20-40 (+10), 4", [20, 30, 40, 4]),
    ("seed", "10-1 (-3)", [10, 7, 4, 1]),
    ("seed", "-1, 7", [-1, 7]),  # a negative number is no range
    ("cfg", "1-3 (+0.5)", [1.0, 1.5, 2.0, 2.5, 3.0]),
    ("cfg", "1-10 [4]", [1.0, 4.0, 7.0, 10.0]),
    ("sampler", 'euler, "dpmpp_2m, karras",, heun', ["euler", "dpmpp_2m, karras", "heun"]),
])
def test_axis_values_take_a1111_ranges(field, text, values):
    from core.grid import parse_values

    assert parse_values(field, text) == values


@pytest.mark.parametrize(("field", "text", "message"), [
    ("steps", "4, many", r"grid.y = 'many' is invalid: numbers, or ranges as 1-5"),
    ("steps", "1.5-3", r"grid.y = '1.5-3' is invalid: whole numbers"),
    ("seed", "5-1 (+1)", r"grid.y = '5-1 \(\+1\)' is invalid: a step that goes from the first"),
    ("seed", "1-100000", r"at most 1000 values"),
    ("cfg", " , ", r"grid.y = ' , ' is invalid: one or more values"),
])
def test_bad_axis_values_name_the_axis(field, text, message):
    from core.grid import parse_values

    with pytest.raises(RequestError, match=message):
        parse_values(field, text, "grid.y")


def test_saved_grid_carries_the_base_request_and_the_axes(tmp_path):
    from core.grid import save_grid
    from core.metadata import read_request
    from core.store import JobStore

    axes = parse_axes({"x": {"field": "cfg", "values": [5, 7]}})
    cells = []
    for i in range(2):
        Image.new("RGB", (8, 8), (90 * i, 0, 0)).save(tmp_path / f"c{i}.png")
        cells.append(({"id": "g", "x": i}, str(tmp_path / f"c{i}.png")))
    store = JobStore(tmp_path / "db.sqlite3")
    store.add_grid("g", {"x": {"field": "cfg", "values": [5, 7]}}, base())
    path = save_grid(cells, axes, base(), "g", tmp_path / "out", store)
    assert store.open_grids() == []  # closed in the transaction that records the image: never both at once
    assert path.parent.parent == tmp_path / "out" and not list(path.parent.glob(".tmp-*"))
    with Image.open(path) as saved:
        assert "Script: X/Y/Z plot, X Type: CFG Scale, X Values: \"5, 7\"" in saved.text["parameters"]
    again = read_request(path)
    assert again.prompt == "a red cat" and again.extra["grid"] == {
        "id": "g", "image": True, "axes": {"x": {"field": "cfg", "values": [5, 7]}}}
    (row,) = store.history()
    assert row.path == str(path) and row.request.extra["grid"]["image"] is True


def test_batch_grid_cells_share_one_seed_when_the_job_leaves_it_random(tmp_path, monkeypatch):
    """As A1111's X/Y/Z and the TUI's grid: a -1 seed is drawn once per grid, so the cells differ only in the
    axes' fields; two grids draw their own."""
    run = batch_runner(tmp_path, monkeypatch, RecordingRunner)
    jobs = tmp_path / "grid.toml"
    jobs.write_text('[grid]\nx = {field = "cfg", values = [5, 6, 7]}\n\n[[job]]\nmodel = "fake"\nprompt = "a"\n'
                    'steps = 1\n\n[[job]]\nmodel = "fake"\nprompt = "b"\nsteps = 1\n')
    code, out, err = run(str(jobs))
    assert code == 0, err
    seeds = [r.seed for r in RecordingRunner.seen]
    assert [r.cfg for r in RecordingRunner.seen] == [5.0, 6.0, 7.0] * 2
    assert len(set(seeds[:3])) == 1 and len(set(seeds[3:])) == 1 and -1 not in seeds
