"""Opening single-file checkpoints: inspect (keys and shapes only), load (memory-mapped); hashes are
``core.models.hashes``.

``inspect_checkpoint`` reads only the safetensors header, so a models folder can be classified without
touching gigabytes. ``load_checkpoint`` builds each network on the meta device from the config read off its
keys and shapes, then assigns the file's tensors into it: on the CPU the weights stay memory-mapped views of
the file at the file's dtype (no fp32 copy, no second copy at all until a page is touched).

What is loaded comes from the file's family (``core/models/families/``): its components, their prefixes and
their config and network classes. A family whose components all name a network loads here unchanged.

Each component is loaded from a (file, prefix) of its own (``load_components``): a combined checkpoint is the
case where every component comes from one file; a diffusion model kept alone (BFL's ``flux1-dev``, ComfyUI's
``diffusion_models``) takes its text encoders and VAE from part files (``parts``: role -> file, each checked to
be the kind of part the component names, ``core.models.parts``). Weights stored packed (fp8, GGUF block
quantisations) stay packed: their layers dequantise at forward time (``core.models.quant``).
"""

from __future__ import annotations

import pickle
import threading
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from core.errors import CheckpointError
from core.models.detect import OTHER_KINDS, VAE_PARTS, CheckpointInfo, detect, dominant_dtype
from core.models.families import FAMILIES, get_family, runnable
from core.models.family import Component, ModelFamily
from core.models.parts import with_article as _a
from core.models.safetensors_header import open_regular, read_header, short_repr, sniff

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

def _ignorable(component: str, rel_key: str) -> bool:
    """Keys real files carry inside a component that no network needs."""
    if rel_key.endswith("position_ids"):  # CLIP's arange buffer, saved by older transformers versions
        return True
    if component.startswith("text_encoder") and rel_key == "logit_scale":  # OpenCLIP's contrastive temperature
        return True
    if component.startswith("text_encoder") and rel_key == "encoder.embed_tokens.weight":
        return True  # T5's tied copy of shared.weight, which transformers' state_dict() also writes
    return component == "vae" and rel_key.startswith("loss.")  # training-time discriminator/LPIPS


def supported_labels() -> str:
    return ", ".join(f.label for f in runnable())


# --------------------------------------------------------------------------------------------------- sources


class TensorSource:
    """Keys, shapes and dtypes of a checkpoint, and its tensors one at a time."""

    path: Path
    format: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SafetensorsSource(TensorSource):
    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = read_header(path)
        self.shapes = self.header.shapes
        self.dtypes = self.header.dtypes
        self._handle: Any = None

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            if self._handle is None:
                from safetensors import safe_open

                # safe_open maps the file (MAP_PRIVATE); get_tensor returns a view, pages are read on first use.
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            # read_header checks what safetensors checks, so this is a file that changed since, or a case
            # neither foresaw: still a bad file, named, not an internal error
            raise CheckpointError(self.path, f"safetensors cannot read tensor {key!r} ({e})") from None

    def close(self) -> None:
        self._handle = None  # tensors already handed out keep their own reference to the mapping


class GGUFSource(TensorSource):
    """A GGUF file under the names of the checkpoint layout our networks load (``GGUFFile.state_names``)."""

    format = "gguf"

    def __init__(self, path: Path) -> None:
        from core.models.gguf_file import GGUFFile

        self.path = path
        self.file = GGUFFile(path)
        names = self.file.state_names()
        self._names = {state: name for name, state in names.items()}
        self.shapes = {names[k]: v for k, v in self.file.shapes.items()}
        self.dtypes = {names[k]: v for k, v in self.file.dtypes.items()}

    def get(self, key: str) -> Any:
        return self.file.get(self._names[key])

    def check_architecture(self, allowed: frozenset[str], what: str) -> None:
        self.file.check_architecture(allowed, what)

    def close(self) -> None:
        self.file.close()


class PickleSource(TensorSource):
    format = "pickle"

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.path = path
        self.tensors = tensors
        self.shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        self.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt/.pt state dict through the weights-only unpickler; never runs code from the file."""
    obj = unpickle(path)
    for _ in range(2):  # Lightning files nest weights under "state_dict"
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"the file holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "the file is a PyTorch pickle but contains no tensors")
    return tensors


def unpickle(path: Path) -> object:
    """A .ckpt/.pt file's object (dicts, lists, tensors, numbers, strings) through the weights-only
    unpickler; never runs code from the file. Raises ``CheckpointError`` naming what is wrong."""
    try:
        try:
            if path.name.endswith(".safetensors"):
                # torch.load would hand a path with this suffix to safetensors; a file object keeps it a pickle.
                with open(path, "rb") as f:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # pre-1.6 format: no mmap
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(
                path,
                "the file contains pickled Python code and cannot be loaded safely; convert it to .safetensors "
                "with a trusted tool (or download the .safetensors version)",
            ) from None
        raise CheckpointError(path, f"the file is not a readable PyTorch checkpoint ({e})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            path, f"the file is not a readable PyTorch checkpoint (it may be truncated or corrupt: {e})"
        ) from None
    except Exception as e:  # torch's unpickler on a hostile file: KeyError, TypeError, RecursionError, ...
        raise CheckpointError(
            path, f"the file is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); it is corrupt"
        ) from None
    return obj


def open_source(path: str | Path) -> TensorSource:
    """Open a model file by its content (extension only breaks ties); raises CheckpointError."""
    path = Path(path)
    with open_regular(path) as f:  # a FIFO or device named *.safetensors is refused here, not read forever
        try:
            head = f.read(64)
        except OSError as e:
            raise CheckpointError(path, f"the file cannot be read ({e.strerror or e})") from None
    # By content first, extension second: renamed files are common.
    if head[:4] == b"GGUF":
        return GGUFSource(path)
    if head[8:9] == b"{":
        return SafetensorsSource(path)
    if head.startswith(b"PK\x03\x04") or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        return PickleSource(path, _load_pickle(path))  # torch.save zip archive, or a pre-1.6 raw pickle
    if path.suffix.lower() in PICKLE_SUFFIXES:
        kind = sniff(head)
        what = f"this is {kind}" if kind else "the file is neither a PyTorch zip archive nor a pickle"
        raise CheckpointError(path, f"{what}, not a model checkpoint (.safetensors or .ckpt)")
    return SafetensorsSource(path)  # its header parser explains what is wrong


@contextmanager
def _opened(path: str | Path) -> Iterator[TensorSource]:
    source = open_source(path)
    try:
        yield source
    finally:
        source.close()


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Classify a model file; for .safetensors this reads the header only."""
    with _opened(path) as source:
        return _detect(source)


def _detect(source: TensorSource) -> CheckpointInfo:
    try:
        return detect(source.path, source.shapes, source.dtypes, read=source.get, fmt=source.format)
    except (IndexError, ValueError, TypeError, ZeroDivisionError) as e:
        # detection indexes marker keys' shapes; a damaged file gives them too few dimensions
        raise CheckpointError(
            source.path,
            f"its tensor shapes fit no known model layout ({type(e).__name__}: {e}; a key that identifies the "
            "model has the wrong number of dimensions); the file is damaged",
        ) from None


# --------------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedCheckpoint:
    """The networks of one checkpoint by role (``unet``, ``text_encoder``, ``vae``, ...), as loaded."""

    components: dict[str, nn.Module]
    family: str
    dtype: torch.dtype  # of the UNet weights as loaded
    info: CheckpointInfo
    path: Path
    vae_path: Path | None = None
    parts: dict[str, Path] = field(default_factory=dict)  # role -> the part file it came from (not ``path``)

    @property
    def unet(self) -> nn.Module:
        return self.components["unet"]

    @property
    def text_encoder(self) -> nn.Module:
        return self.components["text_encoder"]

    @property
    def vae(self) -> nn.Module:
        return self.components["vae"]

    @vae.setter
    def vae(self, module: nn.Module) -> None:
        self.components["vae"] = module


def _reject(info: CheckpointInfo) -> CheckpointError:
    """The error for a recognised file Darkroom cannot load as a checkpoint."""
    path, fam = info.path, info.family
    if fam == "lora":
        return CheckpointError(path, "this is a LoRA, not a checkpoint; put it in the loras folder")
    if fam == "diffusers":
        return CheckpointError(
            path,
            f"this is a diffusers-format {info.variant} file (one component with diffusers key names); "
            "Darkroom loads single-file checkpoints, so use the model's single .safetensors checkpoint instead",
        )
    if fam == "vae":
        return CheckpointError(
            path, "this is a standalone VAE, not a checkpoint; choose it as the VAE instead"
        )
    if fam == "text_encoder":
        return CheckpointError(path, "this is a standalone text encoder, not a full checkpoint")
    if fam == "unet_only":
        return CheckpointError(
            path, "this file holds only a UNet (no text encoder or VAE); use the full single-file checkpoint"
        )
    if fam in FAMILIES:
        label = FAMILIES[fam].label
        bare = info.prefixes.get("unet") == ""
        if bare and FAMILIES[fam].runnable:
            return CheckpointError(
                path,
                f"this is {_a(label)} transformer alone (no text encoders or VAE in the file); use a combined "
                f"single-file {label} checkpoint (diffusion model, text encoders and VAE in one file)",
            )
        what = f"{label} checkpoint" + (" (transformer only)" if bare else "")
        return CheckpointError(
            path,
            f"this is {_a(what)}; {label} support is not available yet (supported: {supported_labels()})",
        )
    return CheckpointError(
        path,
        "this does not look like a Stable Diffusion checkpoint: none of the known marker keys "
        "(model.diffusion_model.input_blocks.0.0.weight, double_blocks.*, joint_blocks.*) are present",
    )



def _is_packed(dtype: str | None) -> bool:
    """Stored as fp8 or a GGUF block quantisation (the source's dtype names: ``float8_e4m3fn``, ``Q4_K``)."""
    from core.models.quant.ggml import GGML_TYPES, UNQUANTIZED

    return bool(dtype) and (dtype.startswith("float8") or (dtype in GGML_TYPES and dtype not in UNQUANTIZED))


def _target_dtype(keys: list[str], source: TensorSource, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    # A packed file's plain tensors (GGUF keeps embedders in F16/BF16, norms in F32) say the compute dtype.
    plain = [k for k in keys if not _is_packed(source.dtypes.get(k))]
    matrices = [k for k in plain if len(source.shapes[k]) >= 2]
    if len(plain) < len(keys) and (matrices or plain):
        keys = matrices or plain
    name = dominant_dtype(keys, source.dtypes) or "float32"
    target = getattr(torch, name)
    # fp8 files are a storage format; compute needs a real float type.
    return torch.float16 if target.itemsize == 1 else target


_meta_build = threading.local()  # .active: this thread is constructing a network to load into
_patch_lock = threading.Lock()
_patch_users = 0
_original_register: Any = None


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if getattr(_meta_build, "active", False) and param is not None and param.device.type != "meta":
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _original_register(module, name, param)


# In-place ops that modules' reset_parameters() use (directly or through torch.nn.init).
_INIT_OPS = frozenset({"normal_", "uniform_", "fill_", "zero_", "copy_", "erfinv_", "mul_", "add_", "clamp_",
                       "sub_", "div_", "exponential_", "bernoulli_", "random_", "zeros_", "ones_", "constant_",
                       "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                       "trunc_normal_", "orthogonal_"})


class _SkipMetaInit(TorchFunctionMode):
    """Skips initialising parameters that live on the meta device: they hold no data, and initialising them is
    slow. Meta ``normal_`` runs a Python decomposition whose first use imports torch._dynamo (~1.5 s, and long
    stretches holding the GIL, which froze the UI). Torch function modes are per thread."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INIT_OPS:
            # torch.nn.init functions pass the tensor by keyword, Tensor methods as self
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Construct modules with parameters on the meta device but buffers on the CPU.

    Parameters are about to be replaced by the file's tensors, so allocating and initialising them would only
    cost time and memory (their initialisation is skipped too, see ``_SkipMetaInit``). Buffers a network computes itself (not saved in the file, e.g. CLIP position ids)
    must be real, so they stay on the CPU (``torch.device("meta")`` would put them on meta too). The
    ``register_parameter`` hook is process-wide while any build runs, but only acts in the building thread.
    """
    global _patch_users, _original_register
    with _patch_lock:
        if _patch_users == 0:
            _original_register = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _patch_users += 1
    _meta_build.active = True
    try:
        with _SkipMetaInit():
            yield
    finally:
        _meta_build.active = False
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                nn.Module.register_parameter = _original_register  # type: ignore[method-assign]


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _load_component(
    source: TensorSource,
    *,
    family: ModelFamily,
    component: Component,
    prefix: str,
    keys: tuple[str, ...] | list[str],
    device: torch.device,
    dtype: torch.dtype | None,
) -> nn.Module:
    from core.models.quant import is_quant_aux_key

    path = source.path
    label = f"{family.label} {component.label}"
    rel_to_key = {k[len(prefix) :]: k for k in keys}
    if (
        component.network.endswith(":CLIPTextModel")
        and rel_to_key
        and not any(r.startswith("text_model.") for r in rel_to_key)
    ):
        # Very old SD1.x files saved CLIPTextModel without its text_model. level.
        rel_to_key = {"text_model." + r: k for r, k in rel_to_key.items()}
    if component.network.endswith(":T5EncoderModel"):
        from core.models.t5 import t5_key_map

        # the tied copy encoder.embed_tokens some exports keep, decoder.* of encoder-decoder files
        rel_to_key = {ours: rel_to_key[theirs] for ours, theirs in t5_key_map(rel_to_key).items()}
    if component.network.endswith(":Qwen3"):
        from core.models.qwen3 import qwen3_key_map

        # with or without the model. prefix (Qwen3ForCausalLM / Qwen3Model), lm_head (logits) left out
        rel_to_key = {ours: rel_to_key[theirs] for ours, theirs in qwen3_key_map(rel_to_key).items()}
    if component.network.endswith(":ZImageTransformer"):
        rel_to_key.pop("norm_final.weight", None)  # unused by Z-Image, kept by some Lumina-derived exports
    # fp8 scales and markers are consumed with their weights (quant.assign_weights), not network keys
    aux = {r: k for r, k in rel_to_key.items() if is_quant_aux_key(r)}
    rel_to_key = {r: k for r, k in rel_to_key.items() if r not in aux}
    shapes = {r: source.shapes[k] for r, k in rel_to_key.items()}

    config_cls, model_cls = component.config_class(), component.network_class()
    try:
        # The family supplies what the weights cannot show (the VAE's scale, the attention head layout).
        config = _config_from(config_cls, shapes, family.name)
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError, CheckpointError) as e:
        if isinstance(e, CheckpointError):
            detail = e.problem
        elif isinstance(e, KeyError):
            detail = f"missing key {e}"
        elif isinstance(e, IndexError):  # a shape with fewer dimensions than the key has in any real model
            detail = "a key's shape has the wrong number of dimensions"
        else:
            detail = str(e)
        raise CheckpointError(
            path, f"cannot read the {label} configuration from its keys: {detail}"
        ) from None
    try:
        with _parameters_on_meta():
            module = model_cls(config)
    except (ValueError, ZeroDivisionError) as e:  # e.g. a width GroupNorm cannot split, read off the shapes
        raise CheckpointError(
            path, f"the {label} its keys describe cannot be built ({e}); the file is damaged or an unsupported variant"
        ) from None
    state = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    floating = {k for k, v in state.items() if v.is_floating_point()}

    for rel, shape in expected.items():
        if rel not in shapes:
            raise CheckpointError(
                path,
                f"key {prefix + rel!r} is missing; the {label} read from this file needs {len(expected)} keys "
                f"under {prefix!r} (the file is damaged or an unsupported variant)",
            )
        if shapes[rel] != shape:
            raise CheckpointError(
                path,
                f"key {rel_to_key[rel]!r} has shape {_fmt_shape(shapes[rel])} but the {label} read from this "
                f"file expects {_fmt_shape(shape)} (the file is damaged or an unsupported variant)",
            )
    for rel in shapes:
        if rel not in expected and not _ignorable(component.role, rel):
            raise CheckpointError(
                path,
                f"key {short_repr(rel_to_key[rel])} is not part of the {label} read from this file "
                "(the file is damaged or an unsupported variant)",
            )

    target = _target_dtype([rel_to_key[r] for r in expected], source, dtype)
    if any(_is_packed(source.dtypes.get(rel_to_key[r])) for r in expected):
        return _load_packed(source, module, label, {**{r: rel_to_key[r] for r in expected}, **aux}, target, device)
    tensors: dict[str, torch.Tensor] = {}
    for rel in expected:
        t = source.get(rel_to_key[rel])
        if rel in floating and not t.is_floating_point():
            raise CheckpointError(
                path,
                f"key {rel_to_key[rel]!r} is stored as {str(t.dtype).removeprefix('torch.')}, but a "
                f"{label} weight must be a floating-point tensor (the file is damaged)",
            )
        if t.device != device:
            t = t.to(device)  # move first, then convert on the device: less host memory, faster
        if t.is_floating_point() and t.dtype != target:
            t = t.to(target)
        tensors[rel] = t
    module.load_state_dict(tensors, strict=True, assign=True)
    module.to(device)  # buffers the network computed itself
    module.eval().requires_grad_(False)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:  # a network bug (a parameter missing from state_dict()), not a bad file
        raise RuntimeError(f"{label}: tensors left on the meta device after loading: {leftover[:3]}")
    return module


def _config_from(config_cls: Any, shapes: dict[str, tuple[int, ...]], family: str) -> Any:
    """``config_cls.from_state_dict(shapes, family=...)``; configs whose weights say everything (T5, Flux) take
    no ``family``."""
    import inspect

    if "family" in inspect.signature(config_cls.from_state_dict).parameters:
        return config_cls.from_state_dict(shapes, family=family)
    return config_cls.from_state_dict(shapes)


def _load_packed(
    source: TensorSource,
    module: nn.Module,
    label: str,
    rel_to_key: dict[str, str],
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """Assign a component with fp8 or GGUF-quantised weights: those layers keep their packed bytes (views of the
    file on the CPU) and dequantise per call; every other tensor is converted to ``dtype``."""
    from core.models.quant import assign_weights

    tensors = {rel: source.get(key) for rel, key in rel_to_key.items()}
    try:
        assign_weights(module, tensors, dtype=dtype, device=device)
    except ValueError as e:
        raise CheckpointError(source.path, f"the {label} weights cannot be used: {e}") from None
    module.to(device)
    module.eval().requires_grad_(False)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{label}: tensors left on the meta device after loading: {leftover[:3]}")
    return module


def _vae_keys(source: TensorSource, prefix: str) -> list[str]:
    return [k for k in source.shapes if k.startswith(prefix) and k[len(prefix) :].startswith(VAE_PARTS)]


def _load_vae_file(
    vae_path: Path, *, family: str, device: torch.device, dtype: torch.dtype | None
) -> nn.Module:
    spec = get_family(family)
    component = spec.component("vae")
    with _opened(vae_path) as source:
        info = _detect(source)
        if info.family == "diffusers" and info.variant == "vae":
            raise CheckpointError(
                vae_path,
                "this VAE uses diffusers key names (decoder.up_blocks.…); use a single-file VAE with LDM names "
                "(encoder.down.0…, decoder.up.0…), usually the .safetensors next to it on the download page",
            )
        if info.family == "vae":
            prefix = info.prefixes["vae"]
        elif info.family in FAMILIES and "vae" in info.prefixes:
            prefix = info.prefixes["vae"]  # a full checkpoint used as a VAE donor
        else:
            raise CheckpointError(
                vae_path,
                f"this is {info.label}, not a VAE (expected encoder.*/decoder.* or first_stage_model.* keys)",
            )
        latent = (*source.shapes.get(prefix + "decoder.conv_in.weight", ()), 0, 0)[1]
        channels = spec.latent.raw_channels if spec.latent else latent
        if latent != channels:
            raise CheckpointError(
                vae_path, f"this VAE has {latent} latent channels but {spec.label} needs a {channels}-channel VAE"
            )
        return _load_component(
            source,
            family=spec,
            component=component,
            prefix=prefix,
            keys=_vae_keys(source, prefix),
            device=device,
            dtype=dtype,
        )


def load_vae(
    path: str | Path, *, family: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load only a VAE for a ``family`` checkpoint: a VAE file, or a full checkpoint's built-in VAE.

    Lets a caller swap the VAE of a loaded checkpoint without reloading its UNet and text encoder.
    """
    return _load_vae_file(Path(path), family=family, device=torch.device(device), dtype=dtype)


def _owners(prefixes: Mapping[str, str], keys: list[str]) -> dict[str, list[str]]:
    """role -> the keys whose longest matching prefix is that role's (one file holding several components)."""
    out: dict[str, list[str]] = {role: [] for role in prefixes}
    for key in keys:
        best, best_len = None, -1
        for role, prefix in prefixes.items():
            if key.startswith(prefix) and len(prefix) > best_len:
                best, best_len = role, len(prefix)
        if best is not None:
            out[best].append(key)
    return out


def _check_gguf(source: TensorSource, family: ModelFamily, component: Component) -> None:
    from core.models.parts import GGUF_ARCHITECTURES, PARTS

    if not isinstance(source, GGUFSource):
        return
    key = component.part if component.role != family.denoiser.role else family.name
    what = PARTS[key].label if key in PARTS else f"{family.label} diffusion model"
    allowed = GGUF_ARCHITECTURES.get(key)
    if allowed is None:
        raise CheckpointError(source.path, f"the {family.label} {component.label} cannot be loaded from a GGUF file "
                              "(GGUF is read for diffusion models and T5 and Qwen3 text encoders); use its .safetensors file")
    source.check_architecture(allowed, _a(what))


def load_components(
    family: ModelFamily,
    sources: Mapping[str, tuple[str | Path, str]],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, nn.Module]:
    """Load ``family``'s components named in ``sources`` (role -> (file, key prefix)), each from its own file.

    A combined checkpoint gives every role the same file (each component takes the keys of its prefix, the
    longest prefix winning); a split set gives each its part file (prefix usually ``""``). Each file is opened
    once. Raises CheckpointError naming the file for every problem."""
    device = torch.device(device)
    by_file: dict[Path, dict[str, str]] = {}
    for role, (path, prefix) in sources.items():
        by_file.setdefault(Path(path), {})[role] = prefix
    modules: dict[str, nn.Module] = {}
    for path, prefixes in by_file.items():
        with _opened(path) as source:
            owned = _owners(prefixes, list(source.shapes))
            for component in family.components:
                role = component.role
                if role not in prefixes:
                    continue
                _check_gguf(source, family, component)
                keys = owned[role]
                if role == "vae":
                    keys = [k for k in keys if k[len(prefixes[role]) :].startswith(VAE_PARTS)]
                if not keys:
                    raise CheckpointError(
                        path, f"the file has no {family.label} {component.label} (no {prefixes[role]}* keys)"
                    )
                modules[role] = _load_component(
                    source, family=family, component=component, prefix=prefixes[role], keys=keys, device=device,
                    dtype=dtype,
                )
    return {c.role: modules[c.role] for c in family.components if c.role in modules}


def part_prefix(path: str | Path, family: ModelFamily, component: Component) -> str:
    """The key prefix of ``component`` in the part file ``path``, after checking by its keys that the file is the
    kind of part the component needs (``Component.part``); CheckpointError naming the file otherwise."""
    from core.models.parts import PARTS, detect_part

    path = Path(path)
    wanted = PARTS.get(component.part)
    if wanted is None:
        raise CheckpointError(
            path, f"the {family.label} {component.label} is loaded from the checkpoint itself, not a separate file"
        )
    with _opened(path) as source:
        _check_gguf(source, family, component)
        match = detect_part(source.shapes)
        if match is not None and match.kind == component.part:
            return match.prefix
        what = _a(PARTS[match.kind].label) if match is not None else _detect(source).label
    raise CheckpointError(path, f"this is {what}, not the {wanted.label} {family.label} needs as its {component.label}")


def load_checkpoint(
    path: str | Path,
    *,
    vae_path: str | Path | None = None,
    parts: Mapping[str, str | Path] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint's UNet (or transformer), text encoders and VAE; ``vae_path`` replaces the built-in VAE
    and ``parts`` (role -> file) loads components from separate files: a diffusion model kept alone needs one
    for each of its other components (``core.models.split.resolve_parts`` picks them).

    ``dtype=None`` keeps each component at the dtype stored in the file (packed fp8/GGUF weights stay packed);
    otherwise tensors are converted one at a time as they are read. Raises CheckpointError for every problem
    with the files.
    """
    path = Path(path)
    device = torch.device(device)
    parts = {role: Path(p) for role, p in (parts or {}).items()}
    with _opened(path) as source:
        info = _detect(source)
    family = FAMILIES.get(info.family)
    bare = info.prefixes.get("unet") == ""  # the denoiser alone (BFL's flux1-dev, ComfyUI diffusion_models)
    if family is None or not family.runnable or (info.prefixes.get("unet") != family.denoiser.prefix and not bare):
        raise _reject(info)
    sources: dict[str, tuple[Path, str]] = {}
    for component in family.components:
        role = component.role
        if role == "vae" and vae_path is not None:
            continue
        if role in parts:
            kind = replace(component, part=component.part_for(info.variant))  # the part this variant takes
            sources[role] = (parts[role], part_prefix(parts[role], family, kind))
        elif role in info.component_keys:
            sources[role] = (path, info.prefixes[role])
        elif bare:
            raise CheckpointError(
                path, f"this file holds only the {family.label} diffusion model; its {component.label} must come "
                "from a separate file (text_encoders or vae)"
            )
        else:
            hint = "; pass a separate VAE file" if role == "vae" else ""
            raise CheckpointError(path, f"the checkpoint has no {component.label} (no {component.prefix}* keys){hint}")
    modules = load_components(family, sources, device=device, dtype=dtype)
    if vae_path is not None:
        modules["vae"] = _load_vae_file(Path(vae_path), family=info.family, device=device, dtype=dtype)
    unet_dtype = next(t.dtype for t in modules["unet"].parameters() if t.is_floating_point())
    return LoadedCheckpoint(
        components={c.role: modules[c.role] for c in family.components},
        family=info.family,
        dtype=unet_dtype,
        info=info,
        path=path,
        vae_path=Path(vae_path) if vae_path is not None else None,
        parts={role: p for role, p in parts.items() if role != "vae" or vae_path is None},
    )


__all__ = [
    "CheckpointInfo",
    "LoadedCheckpoint",
    "OTHER_KINDS",
    "inspect_checkpoint",
    "load_checkpoint",
    "load_components",
    "open_source",
]
