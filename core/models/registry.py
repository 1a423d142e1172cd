"""Find checkpoints, VAEs and LoRAs in the models folders people already have.

Each root may be:
- an app folder holding ``models/`` (``~/ComfyUI``, ``~/stable-diffusion-webui``);
- a ``models`` folder itself (``~/ComfyUI/models``): ComfyUI ``checkpoints``/``vae``/``loras`` (and, for models
  kept as separate files, ``diffusion_models`` or ``unet`` and ``text_encoders`` or ``clip``), A1111 and Forge
  ``Stable-diffusion``/``VAE``/``Lora`` (Forge: ``text_encoder``); model upscalers in ComfyUI ``upscale_models`` or
  A1111 ``ESRGAN``/``RealESRGAN``;
- a folder of checkpoints (none of the above sub-folders in it).

Files are found recursively; names are paths relative to their kind's folder without the extension, with ``/``
separators (``sd15/dreamshaper_8``). When one name exists with several extensions the ``.safetensors`` file wins
(then ``.ckpt``, then ``.pt``); when two roots hold the same name the earlier root wins.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core import paths
from core.errors import ModelNotFoundError
from core.models.safetensors_header import file_kind

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt")  # in order of preference
MODELS_ENV = "DARKROOM_MODELS"

# kind -> sub-folder names used by ComfyUI, A1111/Forge (and the LyCORIS extension for LoRAs). A diffusion model
# kept apart from its text encoders and VAE (ComfyUI's diffusion_models/unet) is listed and named like a
# checkpoint: a job's ``model`` names either.
KIND_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("checkpoints", "Stable-diffusion", "diffusion_models", "unet"),
    "vae": ("vae", "VAE"),
    "lora": ("loras", "Lora", "LyCORIS"),
    "text_encoder": ("text_encoders", "clip", "text_encoder"),
    "embedding": ("embeddings",),  # textual inversion (A1111: <webui>/embeddings, ComfyUI: models/embeddings)
    "upscaler": ("upscale_models", "ESRGAN", "RealESRGAN"),  # ComfyUI; A1111 (core/upscale.py runs them)
    # the detail pass's YOLO detectors (ADetailer: models/adetailer; ComfyUI Impact Pack: models/ultralytics/bbox)
    "detector": ("adetailer", "ultralytics"),
}
_A1111_FOLDERS = {"checkpoint": "Stable-diffusion", "vae": "VAE", "lora": "Lora", "text_encoder": "text_encoder",
                  "embedding": "embeddings", "upscaler": "ESRGAN", "detector": "adetailer"}
# GGUF quantisations exist for diffusion models and text encoders (ComfyUI-GGUF, stable-diffusion.cpp)
KIND_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "checkpoint": (*MODEL_EXTENSIONS, ".gguf"),
    "vae": MODEL_EXTENSIONS,
    "lora": MODEL_EXTENSIONS,
    "text_encoder": (".safetensors", ".gguf"),
    "embedding": MODEL_EXTENSIONS,
    "upscaler": (".safetensors", ".pth", ".pt"),  # read as weights only (never pickle code)
    "detector": (".pt",),  # ultralytics' own pickles: only ultralytics loads them (core/detectors.py)
}
KIND_LABELS = {"checkpoint": "checkpoint", "vae": "VAE", "lora": "LoRA", "text_encoder": "text encoder",
               "embedding": "embedding", "upscaler": "upscaler", "detector": "detector model"}


@dataclass(frozen=True)
class ModelFile:
    name: str  # relative path without extension, "/"-separated
    path: Path
    size: int


@dataclass(frozen=True)
class ModelInfo:
    """What a model file is, from its header alone (``ModelRegistry.inspect``)."""

    family: str | None  # a family name (``core.models.families.FAMILIES``), another kind ("lora", "vae",
    #                     "unknown"), or None when the file could not be inspected
    label: str  # what users read: "SDXL", "SD1.x inpaint", "a LoRA", or a short reason ("not inspected")
    variant: str | None = None
    dtype: str | None = None  # the denoiser's dominant dtype ("float16", "bfloat16", "float8_e4m3fn")
    problem: str | None = None  # why the file could not be inspected (one sentence)
    quant: str | None = None  # how its weights are stored: "bf16", "fp16", "fp8", "Q8_0", "Q4_K", ...
    part: str | None = None  # a separate part's kind (core.models.parts.PARTS: "t5xxl", "clip_l", "flux_vae")
    split: bool = False  # a family's denoiser alone: its text encoders and VAE come from other files
    base: str | None = None  # a LoRA's: the family it was made for (core.lora.detect); None: its keys do not say

    @property
    def is_family(self) -> bool:
        from core.models.families import FAMILIES

        return self.family in FAMILIES


def inspect_file(path: Path) -> ModelInfo:
    """Inspect one model file's header, torch-free (the UI thread's model scan may call it). A ``.ckpt``/``.pt``
    is a pickle, which is not read to classify it; any unreadable file gives its reason in ``problem``."""
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".gguf"):
        return ModelInfo(None, "not inspected",
                         problem=f"a {path.suffix} file is a pickle, not opened for a listing; its family shows "
                         "when it loads")
    from core.errors import DarkroomError
    from core.models.detect import detect

    try:
        if suffix == ".gguf":
            from core.models.gguf_header import read_gguf_header

            gguf = read_gguf_header(path)
            if gguf.unsupported:
                name, type_id = next(iter(gguf.unsupported.items()))
                return ModelInfo(None, "unreadable", problem=f"tensor {name!r} is stored as GGML type id {type_id}, "
                                 "which Darkroom cannot dequantise")
            shapes, dtypes, read, fmt = gguf.shapes, gguf.dtypes, None, "gguf"
        else:
            from core.models.safetensors_header import read_floats, read_header

            header = read_header(path)
            shapes, dtypes, fmt = header.shapes, header.dtypes, "safetensors"

            def read(key: str) -> object:
                return read_floats(header, key)

        info = detect(path, shapes, dtypes, read=read, fmt=fmt)
    except DarkroomError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        return ModelInfo(None, "unreadable", problem=problem)
    except Exception as exc:  # noqa: BLE001 - a hostile header must not break a listing: said, never raised
        return ModelInfo(None, "unreadable", problem=f"{type(exc).__name__}: {exc}")
    result = _with_parts(ModelInfo(info.family, info.label, info.variant, info.dtype), info, shapes, dtypes)
    if result.family == "lora":
        from dataclasses import replace

        from core.lora.detect import lora_family

        result = replace(result, base=lora_family(shapes)[0])
    return result


def _with_parts(base: ModelInfo, info: object, shapes: dict, dtypes: dict) -> ModelInfo:
    """``base`` with its quantisation label, and the part kind of a text encoder or VAE file."""
    from dataclasses import replace

    from core.models.families import FAMILIES
    from core.models.parts import PARTS, detect_part, quant_label
    from core.models.parts import with_article as _a

    prefixes = getattr(info, "prefixes", {}) or {}
    if base.family in FAMILIES:
        prefix = prefixes.get("unet", "")
        return replace(base, quant=quant_label(shapes, dtypes, prefix), split=prefix == "")
    match = detect_part(shapes) if base.family in ("text_encoder", "vae") else None
    if match is None:
        return replace(base, quant=quant_label(shapes, dtypes))
    label = PARTS[match.kind].label
    return replace(base, label=f"{_a(label)}", quant=quant_label(shapes, dtypes, match.prefix), part=match.kind)



_DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def short_dtype(dtype: str | None) -> str:
    """``float16`` -> ``fp16``, ``float8_e4m3fn`` -> ``fp8 e4m3fn``, None -> ``-``."""
    if not dtype:
        return "-"
    return _DTYPE_SHORT.get(dtype) or dtype.replace("float8_", "fp8 ")


def human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _env_dirs() -> list[Path]:
    value = os.environ.get(MODELS_ENV, "")
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part.strip()]


def _same_dir_seen(path: Path, seen: list[Path]) -> bool:
    """True if ``path`` is a folder already in ``seen`` (also across case-insensitive file systems)."""
    for other in seen:
        try:
            if path.samefile(other):
                return True
        except OSError:
            continue
    return False


class ModelRegistry:
    """Scans the models roots once (lazily); ``refresh()`` rescans."""

    def __init__(self, models_dirs: Sequence[Path | str] | None = None) -> None:
        if models_dirs is None:
            roots = [*_env_dirs(), paths.default_models_dir()]
        else:
            roots = [Path(p).expanduser() for p in models_dirs]
        self.roots: list[Path] = []
        for root in roots:
            if root not in self.roots:
                self.roots.append(root)
        self._files: dict[str, list[ModelFile]] | None = None
        self._dirs: dict[str, list[Path]] = {}
        self._shadowed: dict[str, list[ModelFile]] = {}  # same name as a listed file (other extension or root)
        # named like a model but not a regular file (FIFO, device, dangling link): never listed or opened
        self._unusable: dict[str, list[tuple[str, Path, str]]] = {}
        # path -> ((mtime_ns, size), info): a rescan re-reads only the headers of files that changed
        self._inspected: dict[str, tuple[tuple[int, int], ModelInfo]] = {}

    # ---- scanning ---------------------------------------------------------------------------------------

    def _kind_dirs(self) -> dict[str, list[Path]]:
        dirs: dict[str, list[Path]] = {kind: [] for kind in KIND_FOLDERS}
        for root in self.roots:
            if not root.is_dir():
                continue
            found_checkpoints = False
            for base in (root / "models", root):
                for kind, names in KIND_FOLDERS.items():
                    for name in names:
                        folder = base / name
                        if folder.is_dir():
                            found_checkpoints = found_checkpoints or kind == "checkpoint"
                            if not _same_dir_seen(folder, dirs[kind]):
                                dirs[kind].append(folder)
            # A plain folder of checkpoints stays one when a vae/ or loras/ folder is added to it (as the
            # missing-VAE message suggests); those folders are skipped when it is walked for checkpoints.
            if not found_checkpoints and not _same_dir_seen(root, dirs["checkpoint"]):
                dirs["checkpoint"].append(root)
        return dirs

    def _scan(self) -> dict[str, list[ModelFile]]:
        if self._files is not None:
            return self._files
        self._dirs = self._kind_dirs()
        files: dict[str, list[ModelFile]] = {}
        self._shadowed = {}
        self._unusable = {}
        for kind, folders in self._dirs.items():
            shadowed: list[ModelFile] = []
            unusable = self._unusable.setdefault(kind, [])
            chosen: dict[str, tuple[int, ModelFile]] = {}
            # other kinds' folders inside a checkpoint folder (a plain root with a vae/ folder) are theirs
            skip = {os.path.realpath(f) for k, fs in self._dirs.items() if k != kind for f in fs}
            for folder in folders:
                seen_here: dict[str, tuple[int, ModelFile]] = {}
                extensions = KIND_EXTENSIONS[kind]
                for path in _walk(folder, skip, extensions):
                    rank = extensions.index(path.suffix.lower())
                    name = path.relative_to(folder).with_suffix("").as_posix()
                    problem = not_a_regular_file(path)
                    if problem is not None:  # opening a FIFO would wait forever; a device never ends
                        unusable.append((name, path, problem))
                        continue
                    try:
                        size = path.stat().st_size
                    except OSError:
                        continue
                    item = ModelFile(name, path, size)
                    if name not in seen_here or rank < seen_here[name][0]:
                        if name in seen_here:
                            shadowed.append(seen_here[name][1])
                        seen_here[name] = (rank, item)
                    else:
                        shadowed.append(item)
                for name, item in seen_here.items():
                    if name in chosen:
                        shadowed.append(item[1])
                    else:
                        chosen[name] = item  # earlier folders win
            self._shadowed[kind] = shadowed
            files[kind] = sorted((item for _, item in chosen.values()), key=lambda m: (m.name.lower(), m.name))
        self._files = files
        return files

    def refresh(self) -> None:
        self._files = None

    # ---- listing ----------------------------------------------------------------------------------------

    def checkpoints(self) -> list[ModelFile]:
        return list(self._scan()["checkpoint"])

    def shadowed(self, kind: str = "checkpoint") -> list[ModelFile]:
        """Files of ``kind`` that a listed file of the same name hides (an earlier folder, or a preferred
        extension, wins): reachable only by their path."""
        self._scan()
        return list(self._shadowed.get(kind, []))

    def unusable(self, kind: str = "checkpoint") -> list[tuple[str, Path, str]]:
        """(name, path, why) of the entries of ``kind``'s folders that are no regular file (a dangling or looping
        symlink, a FIFO): left out of the listings, but a user looking for one is told why."""
        self._scan()
        return list(self._unusable.get(kind, []))

    def vaes(self) -> list[ModelFile]:
        return list(self._scan()["vae"])

    def loras(self) -> list[ModelFile]:
        return list(self._scan()["lora"])

    def text_encoders(self) -> list[ModelFile]:
        return list(self._scan()["text_encoder"])

    def parts_of(self, kind: str) -> list[ModelFile]:
        """The files of one part kind (``core.models.parts.PARTS``: "t5xxl", "flux_vae", ...) in its folders,
        by name, recognised by their keys (headers are read once per file change)."""
        from core.models.parts import PARTS

        part = PARTS[kind]
        return [m for m in self._scan()[part.folder] if self.inspect(m).part == kind]
    def embeddings(self) -> list[ModelFile]:
        return list(self._scan()["embedding"])

    def upscalers(self) -> list[ModelFile]:
        """Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, ...) in ``upscale_models`` / ``ESRGAN`` / ``RealESRGAN``."""
        return list(self._scan()["upscaler"])

    def inspect(self, model: ModelFile | Path | str) -> ModelInfo:
        """The family (label, variant, dtype) of a model file from its header, cached by path, mtime and size
        (so listing a large folder again reads nothing). Torch-free; a file header is read at most once per
        change, but call it from a worker thread for a folder of many files."""
        path = Path(model.path if isinstance(model, ModelFile) else model)
        try:
            st = os.stat(path)
        except OSError as exc:
            return ModelInfo(None, "unreadable", problem=exc.strerror or str(exc))
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._inspected.get(str(path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = inspect_file(path)
        self._inspected[str(path)] = (stamp, info)
        return info

    @property
    def search_dirs(self) -> list[Path]:
        """Every folder looked in: the kind folders found, and each root that holds none (or does not exist)."""
        self._scan()
        out: list[Path] = []
        for folders in self._dirs.values():
            out.extend(f for f in folders if f not in out)
        for root in self.roots:
            if not any(_is_within(f, root) for f in out):
                out.append(root)
        return out

    def kind_search_dirs(self, kind: str) -> list[Path]:
        """The folders looked in for one kind (``checkpoint``, ``vae``, ``lora``), plus roots that hold nothing."""
        self._scan()
        every = [f for folders in self._dirs.values() for f in folders]
        empty_roots = [r for r in self.roots if not any(_is_within(f, r) for f in every)]
        return list(self._dirs.get(kind, [])) + empty_roots

    def part_dirs(self, kind: str) -> list[Path]:
        """Where files of one kind are looked for: its folders found, else those it would be found in."""
        self._scan()
        return list(self._dirs.get(kind, [])) or self._expected_dirs(kind)

    def _expected_dirs(self, kind: str) -> list[Path]:
        """Where a root's folders of one kind are looked for: in its ``models/`` folder when it has one."""
        out: list[Path] = []
        for root in self.roots:
            if root.is_dir():
                base = root / "models" if (root / "models").is_dir() else root
                out.extend(base / name for name in KIND_FOLDERS[kind])
        return out

    def suggested_dir(self, kind: str) -> Path:
        """The folder to create for ``kind`` in the first root: the A1111 name (``VAE``, ``Lora``) beside an
        A1111 ``Stable-diffusion`` folder, otherwise the ComfyUI one (``vae``, ``loras``)."""
        for folder in self._dirs.get("checkpoint", []):
            if folder.name == _A1111_FOLDERS["checkpoint"]:
                return folder.parent / _A1111_FOLDERS[kind]
            if folder.name in KIND_FOLDERS["checkpoint"]:
                return folder.parent / KIND_FOLDERS[kind][0]
        root = next(r for r in self.roots if r.is_dir())
        base = root / "models" if (root / "models").is_dir() else root
        return base / KIND_FOLDERS[kind][0]

    # ---- lookup -----------------------------------------------------------------------------------------

    def find_checkpoint(self, name_or_path: str | Path) -> Path:
        return self._find("checkpoint", name_or_path)

    def find_vae(self, name_or_path: str | Path) -> Path:
        return self._find("vae", name_or_path)

    def find_lora(self, name_or_path: str | Path) -> Path:
        return self._find("lora", name_or_path)

    def detectors(self) -> list[ModelFile]:
        """The detail pass's YOLO detection models (``.pt``) in ``models/adetailer`` / ``models/ultralytics``."""
        return self._scan()["detector"]

    def find_detector(self, name_or_path: str | Path) -> Path:
        return self._find("detector", name_or_path)

    def find_text_encoder(self, name_or_path: str | Path) -> Path:
        return self._find("text_encoder", name_or_path)

    def find_upscaler(self, name_or_path: str | Path) -> Path:
        """An upscaler by file name, or by the name A1111 lists a downloaded one under (``R-ESRGAN 4x+`` is its
        ``RealESRGAN_x4plus.pth``), as an A1111 image's ``Hires upscaler`` names it."""
        try:
            return self._find("upscaler", name_or_path)
        except ModelNotFoundError as exc:
            file = A1111_UPSCALER_FILES.get(str(name_or_path).strip())
            if file is None:
                raise
            try:
                return self._find("upscaler", file)
            except ModelNotFoundError:
                raise ModelNotFoundError(f"{exc}; {str(name_or_path).strip()!r} is A1111's name for {file}.pth: "
                                         f"put that file in {self.suggested_dir('upscaler')}") from None

    def _find(self, kind: str, name_or_path: str | Path) -> Path:
        """Absolute or existing path; exact relative name; name with extension; unique file-name stem."""
        value = str(name_or_path).strip()
        label = KIND_LABELS[kind]
        extensions = KIND_EXTENSIONS[kind]
        if not value:
            raise ModelNotFoundError(f"no {label} given (empty name)")
        candidate = Path(value).expanduser()
        explicit = candidate.is_absolute() or value.startswith(("~", "./", "../", ".\\", "..\\"))
        if explicit:
            if candidate.is_file():
                return _absolute(candidate)
            problem = not_a_regular_file(candidate)
            if problem is not None and problem != "it does not exist":
                raise ModelNotFoundError(f"{label} file {value!r} cannot be used: {problem}")
            raise ModelNotFoundError(f"{label} file {value!r} does not exist")
        files = self._scan()[kind]
        name = value.replace("\\", "/").strip("/")
        by_name = {m.name: m for m in files}
        if name in by_name:
            return _absolute(by_name[name].path)
        stem, ext = os.path.splitext(name)
        if ext.lower() in extensions:
            every = files + self._shadowed.get(kind, [])
            exact = [m for m in every if m.name == stem and m.path.suffix.lower() == ext.lower()]
            match = exact or [m for m in files if m.name == stem]
            if match:
                return _absolute(match[0].path)
            name = stem
        base = name.rsplit("/", 1)[-1]
        for same in (lambda m: m.name.rsplit("/", 1)[-1] == base,
                     lambda m: m.name.rsplit("/", 1)[-1].lower() == base.lower()):
            matches = [m for m in files if same(m)]
            if len(matches) == 1:
                return _absolute(matches[0].path)
            if len(matches) > 1:
                listed = ", ".join(m.name for m in matches[:5])
                raise ModelNotFoundError(f"{label} {value!r} is ambiguous: it matches {listed}; use the full name")
        if candidate.is_file():  # a relative path from the working folder
            return _absolute(candidate)
        for other, path, problem in self._unusable.get(kind, []):
            if other == name or other.rsplit("/", 1)[-1] == base:
                raise ModelNotFoundError(f"{label} {value!r} cannot be used: {path}: {problem}")
        raise ModelNotFoundError(self._not_found(kind, label, value, name, files))

    def _not_found(self, kind: str, label: str, value: str, name: str, files: list[ModelFile]) -> str:
        # only this kind's folders: a checkpoint is never looked for in vae/ or loras/
        searched = ", ".join(str(d) for d in self.kind_search_dirs(kind)) or "(no folders)"
        if not files and kind != "checkpoint" and not self._dirs.get(kind):
            # No such folder in any root: name the folders looked for and where the files would go.
            expected = self._expected_dirs(kind)
            if expected:
                looked = ", ".join(str(d) for d in expected)
                return (
                    f"{label} {value!r} not found: there is no {label} folder (looked for {looked}); "
                    f"put {label} files ({', '.join(KIND_EXTENSIONS[kind])}) in {self.suggested_dir(kind)}, "
                    f"or give the {label} file's path"
                )
        if not files:
            return (
                f"{label} {value!r} not found: there are no {label} files in {searched} "
                f"(pass --models-dir or set {MODELS_ENV})"
            )
        # compare with whole names and with file names alone, case-insensitively
        keys: dict[str, str] = {}
        for m in files:
            keys.setdefault(m.name.lower(), m.name)
            keys.setdefault(m.name.rsplit("/", 1)[-1].lower(), m.name)
        close: list[str] = []
        for key in difflib.get_close_matches(name.lower(), list(keys), n=6, cutoff=0.4):
            if keys[key] not in close:
                close.append(keys[key])
        hint = f"; close matches: {', '.join(close[:3])}" if close else ""
        return f"{label} {value!r} not found in {searched}{hint}"


def not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` cannot be a model file (a FIFO, a device, a dangling link...), from ``stat`` alone (which
    never blocks, unlike opening); None for a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"it is a symbolic link to {os.readlink(path)!r}, which does not exist"
        return "it does not exist"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"it is a symbolic link loop ({os.readlink(path)!r} leads back to it)"
        return f"it cannot be read ({exc.strerror or exc})"
    kind = file_kind(st.st_mode)
    if kind is None:
        return None
    return f"it is {kind}, not a model file (a model must be a regular file)"


def _walk(
    folder: Path, skip: set[str] | frozenset[str] = frozenset(), extensions: tuple[str, ...] = MODEL_EXTENSIONS
) -> list[Path]:
    """Model files under ``folder``, recursively, skipping hidden files and folders and the folders whose real
    paths are in ``skip``; follows symlinks."""
    out: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited or (real in skip and dirpath != str(folder)):  # a symlink loop, two links to one
            dirnames[:] = []  # folder, or another kind's folder
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith("."):
                continue
            if os.path.splitext(filename)[1].lower() in extensions:
                out.append(Path(dirpath) / filename)
    return out


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


# A1111's names for the upscaler models it downloads itself (modules/realesrgan_model.py, esrgan_model.py): the
# file each stands for, so an A1111 image's "Hires upscaler: R-ESRGAN 4x+" finds RealESRGAN_x4plus.pth.
A1111_UPSCALER_FILES = {
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "ESRGAN_4x": "ESRGAN_4x",
}


def _absolute(path: Path) -> Path:
    """``path`` made absolute without following symlinks: a linked checkpoint keeps the name the user gave it
    (its file name is the model's name in the status line and the load message), not its target's."""
    return Path(os.path.abspath(path))
