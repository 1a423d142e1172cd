"""Hostile model files: each gets one sentence naming the file, never a traceback, a hang or a black image.

The header cases start from a real tiny checkpoint and change only its header, so they would otherwise reach
safetensors' own loader (which refuses them with an error Darkroom reported as ``internal error``) or, for the
nesting case, crash the JSON parser with a RecursionError.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import CheckpointError, DarkroomError, ModelNotFoundError
from core.models.checkpoint import inspect_checkpoint, load_checkpoint
from core.models.registry import ModelRegistry
from core.models.safetensors_header import read_header
from core.models.testing import write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", "sd15", "tiny")


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path: Path, header: dict | bytes, data: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _error(fn, path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        fn(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message  # names the file
    assert "\n" not in message and len(message) < 400, message  # one sentence
    assert "internal error" not in message and "Recursion" not in message and "Safetensor" not in message
    return message


# ---- headers, edited from a real file ------------------------------------------------------------------------


def _overlap(h: dict, data: bytes):
    second = _by_offset(h)[1]
    start, end = h[second]["data_offsets"]
    h[second]["data_offsets"] = [start - 2, end - 2]  # starts inside the first tensor
    return h, data


def _shifted(h: dict, data: bytes):
    for key in _by_offset(h):
        start, end = h[key]["data_offsets"]
        h[key]["data_offsets"] = [start + 8, end + 8]  # 8 bytes before the first tensor belong to none
    return h, bytes(8) + data


def _gap(h: dict, data: bytes):
    keys = _by_offset(h)
    cut = h[keys[1]]["data_offsets"][0]
    for key in keys[1:]:
        start, end = h[key]["data_offsets"]
        h[key]["data_offsets"] = [start + 4, end + 4]
    return h, data[:cut] + bytes(4) + data[cut:]


def _metadata(value):
    def edit(h: dict, data: bytes):
        h["__metadata__"] = value
        return h, data

    return edit


def _raw(text: bytes):
    """Replace the header with hand-written JSON text around the real data."""
    return lambda h, data: (text, data)


def _entry_text(h: dict) -> str:
    key = _by_offset(h)[0]
    return json.dumps(key), json.dumps(h[key])


@pytest.mark.parametrize(
    "edit,expect",
    [
        (_overlap, "overlapping bytes"),
        (_shifted, "starts at byte 8 of the data area, but tensor data must start at 0"),
        (_gap, "leaves 4 bytes unused between tensors"),
        (lambda h, data: (h, data + bytes(16)), "16 bytes after its last tensor"),
        (_metadata({"format": 5}), "__metadata__ entry 'format' is a number"),
        (_metadata({"format": ["pt"]}), "__metadata__ entry 'format' is an array"),
        (_metadata("pt"), "__metadata__ is a string, but it must be an object of strings"),
        (_metadata([1, 2]), "__metadata__ is an array"),
        (_metadata(7), "__metadata__ is a number"),
        (_metadata({"\ud800": "x"}), "not valid Unicode"),
    ],
    ids=["overlap", "shifted", "gap", "trailing", "meta-number", "meta-array-value", "meta-string",
         "meta-array", "meta-int", "meta-surrogate"],
)
def test_edited_header_is_one_sentence_naming_the_file(tiny, tmp_path, edit, expect):
    header, data = _split(tiny)
    path = _write(tmp_path / "hostile.safetensors", *edit(copy.deepcopy(header), data))
    assert expect in _error(load_checkpoint, path)
    assert expect in _error(inspect_checkpoint, path)
    assert expect in _error(read_header, path)  # the torch-free reader the UI uses


def test_the_unedited_file_passes_the_same_checks(tiny, tmp_path):
    header, data = _split(tiny)
    path = _write(tmp_path / "same.safetensors", header, data)  # re-serialised, every check applied
    assert len(read_header(path).tensors) == len(header) - 1
    assert load_checkpoint(path).family == "sd15"
    _write(path, {**header, "__metadata__": None}, data)  # null metadata: safetensors accepts it, so do we
    assert read_header(path).metadata == {}


DEEP = 100_000


@pytest.mark.parametrize(
    "text,expect",
    [
        (b'{"a": {"dtype": "F16", "shape": [NaN], "data_offsets": [0, 4]}}', "contains NaN"),
        (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, Infinity]}}', "contains Infinity"),
        (b'{"a": {"dtype": "F16", "shape": [-Infinity], "data_offsets": [0, 4]}}', "contains -Infinity"),
        (b"[" * DEEP + b"]" * DEEP, "nests more than 16 levels deep"),
        (b'{"a":' * DEEP + b"1" + b"}" * DEEP, "nests more than 16 levels deep"),
        (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, '
         b'"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}', "names 'a' twice"),
        (b'{"a": {"dtype": "F16", "dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "names 'dtype' twice"),
        (b'{"a": 5, "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}', "names 'a' twice"),
        (b'{"__metadata__": {"k": "1", "k": "2"}, "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}',
         "names 'k' twice"),
        (b'{"a\u0000": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, '
         b'"a\u0000": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}', r"names 'a\x00' twice"),
        (b" " * 64, "header is empty"),
        (b"\x00" * 64, "header is empty"),
        (b'{"\\ud800": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}', "not valid Unicode"),
        (b'{"a": {"dtype": "F16", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
         "a number thousands of digits long"),
        (json.dumps({"a": {"dtype": "F16", "shape": [2**40] * 3, "data_offsets": [0, 4]}}).encode(),
         "more elements than any file can hold"),
        (json.dumps({"a": {"dtype": "F16", "shape": [2**62] * 5000, "data_offsets": [0, 4]}}).encode(),
         "more elements than any file can hold"),
        (json.dumps({"a": {"dtype": "F16", "shape": [True, 2], "data_offsets": [0, 4]}}).encode(),
         "invalid shape"),
        (json.dumps({"a": {"dtype": "F16", "shape": [2], "data_offsets": [False, 4]}}).encode(),
         "invalid data_offsets"),
        (json.dumps({"a": {"dtype": ["F16"], "shape": [2], "data_offsets": [0, 4]}}).encode(), "unknown dtype"),
    ],
    ids=["nan", "infinity", "minus-infinity", "deep-array", "deep-object", "duplicate-tensor",
         "duplicate-field", "duplicate-first-invalid", "duplicate-metadata", "duplicate-escaped", "blank", "zeros", "surrogate-name", "huge-number", "huge-shape", "many-dims",
         "bool-dim", "bool-offset", "list-dtype"],
)
def test_hostile_header_text(tmp_path, text, expect):
    path = _write(tmp_path / "hostile.safetensors", text, bytes(4))
    assert expect in _error(load_checkpoint, path)
    assert expect in _error(read_header, path)


def test_long_names_are_shortened_in_messages(tmp_path):
    name = "x" * 1_000_000
    path = _write(tmp_path / "long.safetensors", {name: {"dtype": "F17", "shape": [], "data_offsets": [0, 2]}}, b"")
    assert "xxx..." in _error(read_header, path)


def test_a_long_unexpected_key_is_shortened(tiny, tmp_path):
    tensors = load_file(str(tiny))
    tensors["model.diffusion_model.input_blocks.0.0." + "x" * 100_000] = torch.zeros(2, dtype=torch.float16)
    save_file(tensors, str(tmp_path / "long.safetensors"))
    assert "xxx... is not part of the SD1.x UNet" in _error(load_checkpoint, tmp_path / "long.safetensors")


def test_a_deep_header_is_refused_before_json_recurses(tmp_path, monkeypatch):
    """The pre-check, not RecursionError: json's C parser recursing 1000 levels can overflow a thread's
    small stack (macOS gives threads 512 KB) before Python's limit is reached."""
    import core.models.safetensors_header as header

    def no_json(*args, **kwargs):
        raise AssertionError("json.loads was called")

    monkeypatch.setattr(header.json, "loads", no_json)
    path = _write(tmp_path / "deep.safetensors", b'{"a": ' + b"[" * 20 + b"]" * 20 + b"}", b"")
    assert "nests more than 16 levels deep" in _error(read_header, path)


@pytest.mark.parametrize(
    "text,deep",
    [
        (b"[" * 16 + b"]" * 16, False),
        (b"[" * 17 + b"]" * 17, True),
        (b'["]", ' * 40 + b"1" + b"]" * 40, True),  # a "]" inside a string closes nothing
        (b'{"[[[[[[[[[[[[[[[[[[[[[[[[": 1}', False),  # nor does a "[" open anything
        (b'{"a\\"[[[[[[[[[[[[[[[[[[[[[[[[[[": 1}', False),  # an escaped quote does not end the string
        (b'{"a\\\\": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}", True),  # an escaped backslash does not escape
        (b"[]" * 10_000, False),
        (b"]" * 10_000, False),  # invalid, but not deep: json says so at the first character
    ],
)
def test_nesting_check_reads_strings_as_json_does(text, deep):
    from core.models.safetensors_header import _nesting_exceeds, _without_strings

    assert _nesting_exceeds(_without_strings(text), 16) is deep


# ---- weights with the wrong type -------------------------------------------------------------------------------


def test_integer_weights_are_a_checkpoint_error(tiny, tmp_path):
    tensors = load_file(str(tiny))
    key = "model.diffusion_model.out.2.bias"
    tensors[key] = torch.zeros(tensors[key].shape, dtype=torch.int32)
    save_file(tensors, str(tmp_path / "ints.safetensors"))
    message = _error(load_checkpoint, tmp_path / "ints.safetensors")
    assert repr(key) in message and "int32" in message and "floating-point" in message


@pytest.mark.parametrize(
    "key,shape,expect",
    [
        # detection skips a marker it cannot read (no family claims the file)
        ("model.diffusion_model.input_blocks.0.0.weight", (3,), "does not look like a Stable Diffusion checkpoint"),
        ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (),
         "wrong number of dimensions"),
        ("first_stage_model.decoder.conv_in.weight", (3,), "wrong number of dimensions"),
        ("first_stage_model.encoder.down.3.block.0.conv2.weight", (), "wrong number of dimensions"),
        ("first_stage_model.encoder.conv_in.weight", (1, 1, 1, 1, 1), "cannot be built"),
    ],
)
def test_marker_keys_with_odd_shapes_are_a_checkpoint_error(tiny, tmp_path, key, shape, expect):
    """Found by fuzzing: detection and the config readers index shapes (IndexError, GroupNorm's ValueError)."""
    tensors = load_file(str(tiny))
    tensors[key] = torch.zeros(shape, dtype=torch.float16)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    assert expect in _error(load_checkpoint, path)


def test_safetensors_own_errors_name_the_file(tiny, tmp_path):
    """A file that changes after its header was checked (a download still being written) reaches
    safetensors' own loader; its SafetensorError becomes a CheckpointError, not an internal error."""
    from core.models.checkpoint import open_source

    path = tmp_path / "changing.safetensors"
    path.write_bytes(tiny.read_bytes())
    source = open_source(path)
    path.write_bytes(tiny.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        source.get(next(iter(source.shapes)))
    assert str(err.value).startswith(f"{path}: safetensors cannot read tensor ")


def test_hostile_pickle_is_a_checkpoint_error(tmp_path):
    import pickle

    path = tmp_path / "weird.ckpt"
    path.write_bytes(b"\x80\x02" + b"(" * 100_000 + pickle.STOP)  # marks without end: the unpickler chokes
    assert "not a readable PyTorch checkpoint" in _error(load_checkpoint, path)


# ---- FIFOs, devices and dangling links named *.safetensors ------------------------------------------------------


def _within(seconds: float, fn, *args):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    result: list = []

    def target():
        try:
            result.append(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result.append(("err", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"{fn.__name__} blocked for more than {seconds} s"
    kind, value = result[0]
    if kind == "err":
        raise value
    return value


@needs_fifo
def test_fifo_in_models_folder_is_skipped_and_named(tmp_path):
    models = tmp_path / "models" / "checkpoints"
    models.mkdir(parents=True)
    os.mkfifo(models / "pipe.safetensors")
    os.symlink(tmp_path / "gone.safetensors", models / "dangling.safetensors")
    write_random_checkpoint(models / "good.safetensors", "sd15", "tiny")
    registry = ModelRegistry([tmp_path / "models"])
    assert [m.name for m in _within(10, registry.checkpoints)] == ["good"]
    with pytest.raises(ModelNotFoundError, match=r"pipe\.safetensors: it is a named pipe \(FIFO\)"):
        _within(10, registry.find_checkpoint, "pipe")
    with pytest.raises(ModelNotFoundError, match="symbolic link to .*gone.safetensors.*which does not exist"):
        registry.find_checkpoint("dangling")
    with pytest.raises(ModelNotFoundError, match=r"cannot be used: it is a named pipe \(FIFO\)"):
        registry.find_checkpoint(str(models / "pipe.safetensors"))


@needs_fifo
@pytest.mark.parametrize("fn", [load_checkpoint, inspect_checkpoint, read_header])
def test_loading_a_fifo_does_not_block(tmp_path, fn):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    with pytest.raises(CheckpointError) as err:
        _within(10, fn, path)
    assert str(err.value) == f"{path}: this is a named pipe (FIFO), not a checkpoint file (a model must be a regular file)"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_is_not_read(tmp_path):
    path = tmp_path / "zero.safetensors"
    path.symlink_to("/dev/zero")
    assert "character device" in _error(load_checkpoint, path)
    with pytest.raises(ModelNotFoundError, match="character device"):
        ModelRegistry([tmp_path]).find_checkpoint("zero")


# ---- the batch run --------------------------------------------------------------------------------------------


def _batch(tmp_path: Path, models: Path, jobs: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``darkroom --batch`` in a subprocess, so a hang fails the test instead of stopping the suite."""
    jobs_file = tmp_path / "jobs.toml"
    jobs_file.write_text(jobs)
    env = {**os.environ, "DARKROOM_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    env.pop("DARKROOM_MODELS", None)
    cmd = [sys.executable, "-m", "cli.main", "--batch", str(jobs_file), "--models-dir", str(models),
           "--output-dir", str(tmp_path / "out")]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def _pngs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "out").glob("**/*.png")) if (tmp_path / "out").exists() else []


def _batch_here(tmp_path: Path, models: Path, jobs: str, monkeypatch) -> tuple[int, str, str]:
    """``run_batch`` in this process with the real pipeline (torch is already imported: seconds faster)."""
    import io

    from cli.batch import run_batch

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DARKROOM_MODELS", raising=False)
    jobs_file = tmp_path / "jobs.toml"
    jobs_file.write_text(jobs)
    out, err = io.StringIO(), io.StringIO()
    code = run_batch(str(jobs_file), models_dirs=[models], output_dir=tmp_path / "out",
                     db_path=tmp_path / "db.sqlite3", stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@needs_fifo
def test_batch_with_a_fifo_model_exits_3_naming_it(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    os.mkfifo(models / "pipe.safetensors")
    proc = _batch(tmp_path, models, '[[job]]\nmodel = "pipe"\nprompt = "a cat"\nsteps = 1\n', timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "darkroom: error:" in proc.stderr and "pipe.safetensors" in proc.stderr and "FIFO" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_batch_with_a_hostile_header_exits_3_naming_the_file(tiny, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    header, data = _split(tiny)
    path = _write(models / "shifted.safetensors", *_shifted(copy.deepcopy(header), data))
    code, out, err = _batch_here(tmp_path, models, '[[job]]\nmodel = "shifted"\nprompt = "a cat"\nsteps = 1\n',
                                 monkeypatch)
    assert code == 3, err  # refused before anything runs, as a missing model is
    assert err.startswith(f"darkroom: error: {tmp_path / 'jobs.toml'}: job 1: {path}: the safetensors header says "
                          "the first tensor")
    assert "internal error" not in err and "Traceback" not in err
    assert out == "" and _pngs(tmp_path) == []


# ---- a model that produces NaN ----------------------------------------------------------------------------------


def _nan_model(src: Path, dst: Path, prefix: str) -> Path:
    tensors = load_file(str(src))
    key = next(k for k in tensors if k.startswith(prefix) and k.endswith(".bias"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(dst))
    return dst


@pytest.mark.parametrize(
    "prefix,stage",
    [("model.diffusion_model.out.", "while sampling"), ("first_stage_model.decoder.conv_out", "while decoding")],
)
def test_nan_weights_fail_the_job_instead_of_a_black_image(tiny, tmp_path, prefix, stage):
    from core.pipeline import NonFiniteOutputError, generate, load_model
    from core.request import GenerationRequest

    path = _nan_model(tiny, tmp_path / "nan.safetensors", prefix)
    model = load_model(path, compute_hash=False)
    request = GenerationRequest(model="nan", prompt="a cat", steps=1, seed=1, width=64, height=64)
    with pytest.raises(NonFiniteOutputError) as err:
        generate(model, request)
    message = str(err.value)
    assert isinstance(err.value, DarkroomError) and not isinstance(err.value, CheckpointError)
    assert message.startswith(f"{path}: ") and stage in message and "NaN" in message and "\n" not in message


def test_batch_nan_model_job_fails_and_the_next_job_runs(tiny, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    path = _nan_model(tiny, models / "broken.safetensors", "model.diffusion_model.out.")
    (models / "tiny.safetensors").write_bytes(tiny.read_bytes())
    jobs = "".join(
        f'[[job]]\nmodel = "{m}"\nprompt = "a cat"\nsteps = 1\nseed = 1\nwidth = 64\nheight = 64\n'
        for m in ("broken", "tiny")
    )
    code, out, err = _batch_here(tmp_path, models, jobs, monkeypatch)
    assert code == 1, err
    assert f"[1/2] failed: {path}: the model produced NaN or infinite values while sampling" in err
    assert "internal error" not in err and "Traceback" not in err
    assert "[2/2] done: 1 image(s)" in err
    assert len(out.splitlines()) == 1 and len(_pngs(tmp_path)) == 1  # the good job's image only


def test_finite_check_catches_any_nan_or_inf_and_passes_large_finite_values():
    from types import SimpleNamespace

    from core.pipeline import NonFiniteOutputError, _check_finite

    model = SimpleNamespace(checkpoint=SimpleNamespace(path=Path("m.safetensors"), vae_path=Path("v.safetensors")))
    big = torch.full((4, 4, 64, 64), 65504.0, dtype=torch.float16)  # fp16's largest: its fp16 sum would overflow
    _check_finite(model, big, "sampling")
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[1, 2, 3, 4] = bad
        with pytest.raises(NonFiniteOutputError, match="while sampling"):
            _check_finite(model, x, "sampling")
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = float("inf"), -float("inf")  # they do not cancel out
    with pytest.raises(NonFiniteOutputError, match=r"^v\.safetensors: the VAE produced NaN"):
        _check_finite(model, x, "decoding")


def test_a_cut_off_download_is_refused_before_any_job_runs(tiny, tmp_path, monkeypatch):
    """A checkpoint whose download stopped part-way (its header intact, its data short) was found only when its
    job ran, after the jobs before it; like a missing model, it is now refused before anything runs."""
    models = tmp_path / "models"
    models.mkdir()
    whole = Path(tiny).read_bytes()
    cut = models / "half.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    (models / "whole.safetensors").write_bytes(whole)
    jobs = '[[job]]\nmodel = "whole"\nprompt = "a cat"\nsteps = 1\n[[job]]\nmodel = "half"\nprompt = "a dog"\nsteps = 1\n'
    code, out, err = _batch_here(tmp_path, models, jobs, monkeypatch)
    assert code == 3, err
    assert err.startswith(f"darkroom: error: {tmp_path / 'jobs.toml'}: job 2: {cut}: the file is truncated: its "
                          "header says ")
    assert err.endswith(" are present; re-download it\n") and err.count("\n") == 1
    assert out == "" and _pngs(tmp_path) == []  # job 1 did not run either


def test_a_cut_off_vae_named_by_a_job_is_refused_before_any_job_runs(tiny, tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "vae").mkdir(parents=True)
    whole = Path(tiny).read_bytes()
    (models / "whole.safetensors").write_bytes(whole)
    cut = models / "vae" / "half-vae.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    jobs = ('[[job]]\nmodel = "whole"\nprompt = "a cat"\nsteps = 1\n'
            '[[job]]\nmodel = "whole"\nvae = "half-vae"\nprompt = "a dog"\nsteps = 1\n')
    code, out, err = _batch_here(tmp_path, models, jobs, monkeypatch)
    assert code == 3, err
    assert err.startswith(f"darkroom: error: {tmp_path / 'jobs.toml'}: job 2: vae = 'half-vae' is invalid: {cut} "
                          "cannot be loaded: the file is truncated: its header says ")
    assert out == "" and _pngs(tmp_path) == []
