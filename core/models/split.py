"""Which files a job's model is made of: the diffusion model, and the text encoders and VAE beside it.

A job names the diffusion model in ``model``; ``text_encoders`` (names or paths) and ``vae`` pick the other
parts. A combined checkpoint needs none of them (given ones replace its own). A diffusion model kept alone
(BFL's ``flux1-dev.safetensors``, anything in ComfyUI's ``diffusion_models``) needs a file for each other
component of its family; those not named are picked from the folders by their detected kind
(``core.models.parts``), and the ``PartSet`` says which were picked, so the batch, the TUI and the image's
metadata can say so. A part that is missing is one message naming the part, the folders looked in and the files
to put there. Torch-free: the batch runner checks every job with it before anything loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.errors import ModelNotFoundError, RequestError
from core.models.families import FAMILIES
from core.models.family import Component, ModelFamily
from core.models.parts import PARTS
from core.models.parts import with_article as _a


@dataclass(frozen=True)
class PartSet:
    """The resolved files of one model: role -> file for every component not taken from the model file."""

    model: Path
    family: str | None
    parts: dict[str, Path] = field(default_factory=dict)  # "text_encoder", "text_encoder_2", "vae" -> file
    picked: tuple[str, ...] = ()  # the roles Darkroom chose itself (not named by the job)

    @property
    def vae(self) -> Path | None:
        return self.parts.get("vae")

    @property
    def text_encoders(self) -> dict[str, Path]:
        return {role: p for role, p in self.parts.items() if role != "vae"}

    @property
    def key(self) -> tuple[str, ...]:
        """Identity of the loaded set: every file (the pipeline keeps one model loaded between jobs)."""
        return (str(self.model), *(f"{role}={p}" for role, p in sorted(self.parts.items())))

    def picked_message(self) -> str | None:
        """``using text encoders clip_l.safetensors, t5xxl_fp16.safetensors and VAE ae.safetensors (picked
        from the models folders)``, or None when the job named every part."""
        if not self.picked:
            return None
        encoders = [self.parts[r].name for r in self.picked if r != "vae"]
        said = []
        if encoders:
            said.append(f"text encoder{'s' * (len(encoders) > 1)} {', '.join(encoders)}")
        if "vae" in self.picked:
            said.append(f"VAE {self.parts['vae'].name}")
        return f"using {' and '.join(said)} (picked from the models folders by type)"

    def infotext(self) -> dict[str, str]:
        """Infotext fields that record the parts, so the image says what made it (and reads back into a job)."""
        out: dict[str, str] = {}
        if self.text_encoders:
            out["Text encoders"] = ", ".join(p.name for p in self.text_encoders.values())
        if self.vae is not None:
            out["VAE"] = self.vae.name
        return out



def _part_components(spec: ModelFamily, variant: str | None = None) -> list[Component]:
    """The components a ``variant`` model of ``spec`` may take from part files, each with its kind for that
    variant in ``part`` (FLUX.2 klein 9B: Qwen3-8B)."""
    out = [replace(c, part=c.part_for(variant)) for c in spec.components if c is not spec.denoiser]
    return [c for c in out if c.part in PARTS]


def _missing_message(spec: ModelFamily, registry: object, missing: list[Component]) -> str:
    sentences = []
    for component in missing:
        part = PARTS[component.part]
        folders = registry.part_dirs(part.folder)  # type: ignore[attr-defined]
        looked = ", ".join(str(d) for d in folders) or "(no models folder)"
        files = " or ".join(part.files)
        field_name = "vae" if part.folder == "vae" else "text_encoders"
        sentences.append(f"{spec.label} needs {_a(part.label)}: none in {looked}; put {files} there "
                         f"(or name one in {field_name})")
    return "; ".join(sentences)


def resolve_parts(
    registry: object, model: Path, text_encoders: Sequence[str] = (), vae: str | None = None
) -> PartSet:
    """The parts of the model file ``model`` for a job with these ``text_encoders`` and ``vae``.

    Raises RequestError for a named file that is not a part the family takes, ModelNotFoundError (one message
    for all of them) when a part the model needs is in no folder."""
    parts: dict[str, Path] = {}
    if vae:
        parts["vae"] = registry.find_vae(vae)  # type: ignore[attr-defined]
        inspect = getattr(registry, "inspect", None)
        found = inspect(parts["vae"]) if inspect is not None else None
        if found is not None and found.label == "unreadable":  # cut short, a broken header: said before loading
            raise RequestError("vae", vae, f"{parts['vae']} cannot be loaded: {found.problem}")
    if not hasattr(registry, "inspect"):  # a stand-in registry (tests) that knows checkpoints only
        return PartSet(model, None, parts)
    info = registry.inspect(model)  # type: ignore[attr-defined]
    spec = FAMILIES.get(info.family) if info.family else None
    if spec is None:
        return PartSet(model, None, parts)  # not a model Darkroom knows: loading says what it is
    takes = [c for c in _part_components(spec, info.variant) if PARTS[c.part].folder == "text_encoder"]
    wanted = ", ".join(PARTS[c.part].label for c in takes) or "none"
    for index, name in enumerate(text_encoders):
        path = registry.find_text_encoder(name)  # type: ignore[attr-defined]
        found = registry.inspect(path)  # type: ignore[attr-defined]
        kind = found.part
        role = next((c.role for c in takes if c.part == kind and c.role not in parts), None)
        if role is None:
            if found.problem:
                valid = f"{path.name} cannot be recognised as a text encoder {spec.label} takes ({wanted}): " \
                        f"{found.problem}"
            elif any(c.part == kind for c in takes):
                valid = f"{path.name} is {_a(PARTS[kind].label)}, and {spec.label} takes one, named before it"
            else:
                what = _a(PARTS[kind].label) if kind in PARTS else found.label
                valid = f"{path.name} is {what}, not a text encoder {spec.label} takes ({wanted})"
            raise RequestError(f"text_encoders[{index}]", name, valid)
        parts[role] = path
    if not info.split:
        return PartSet(model, spec.name, _ordered(spec, parts))
    picked: list[str] = []
    missing: list[Component] = []
    for component in _part_components(spec, info.variant):
        if component.role in parts:
            continue
        found = registry.parts_of(component.part)  # type: ignore[attr-defined]
        if not found:
            missing.append(component)
            continue
        # of several, one stored like the diffusion model (a GGUF model with a GGUF T5, fp8 with fp8), by name
        storage = _storage(info.quant)
        best = min(found, key=lambda m: _storage(registry.inspect(m).quant) != storage)  # type: ignore[attr-defined]
        parts[component.role] = Path(best.path)
        picked.append(component.role)
    if missing:
        raise ModelNotFoundError(_missing_message(spec, registry, missing))
    return PartSet(model, spec.name, _ordered(spec, parts), tuple(picked))


def _storage(quant: str | None) -> str:
    """GGUF block quantisation, fp8, or a plain float type."""
    if quant and quant[:1] in "QI":
        return "gguf"
    return "fp8" if quant and quant.startswith("fp8") else "float"


def _ordered(spec: ModelFamily, parts: dict[str, Path]) -> dict[str, Path]:
    return {c.role: parts[c.role] for c in spec.components if c.role in parts}
