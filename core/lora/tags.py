"""How users ask for LoRAs: A1111 prompt tags and the request's ``loras`` list.

Tag syntax (A1111 ``extra_networks.py`` / ``extra_networks_lora.py``, restated in shared/reference lora.md §4):
``<lora:NAME>`` (weights 1), ``<lora:NAME:W>`` (text encoder and UNet both W), ``<lora:NAME:TE:UNET>`` (the
FIRST number is the text-encoder multiplier), named ``te=``/``unet=`` override, ``dyn=`` (a rank cap) is
accepted and not applied. ``<lyco:...>`` (the LyCORIS extension's tag) means the same. Tags are removed from
the text before it is encoded; the prompt as written stays in the request and the image's infotext.

Stdlib only: the request module validates with it on any thread.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

TAG = re.compile(r"<(lora|lyco):([^>]*)>", re.IGNORECASE)
MAX_WEIGHT = 100.0  # a sanity bound only: A1111 accepts any number, useful ones are within +-5


@dataclass(frozen=True)
class LoraRef:
    """One LoRA a request uses: its name (file stem or relative name in the loras folders), the UNet / Flux
    transformer multiplier ``weight`` and the text-encoder multiplier ``te_weight`` (None: same as
    ``weight``)."""

    name: str
    weight: float = 1.0
    te_weight: float | None = None

    @property
    def te(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    @property
    def unet(self) -> float:
        return self.weight

    def tag(self) -> str:
        """The prompt tag that asks for this LoRA: ``<lora:name:weight>``, ``<lora:name:te_weight:weight>``
        (numbers written as the infotext writes them, so they read back exactly)."""
        def number(value: float) -> str:
            return str(int(value)) if float(value).is_integer() else repr(float(value))

        te = "" if self.te_weight is None else f":{number(self.te_weight)}"
        return f"<lora:{self.name}{te}:{number(self.weight)}>"

    def label(self) -> str:
        """The name as A1111 writes it in ``Lora hashes``: without ``:`` and ``,``."""
        return self.name.replace(":", "").replace(",", "")


class TagError(ValueError):
    """A malformed ``<lora:...>`` tag; the message names the tag and what would be valid."""


def with_tags(prompt: str, loras: Any) -> str:
    """``prompt`` with a request's list of LoRAs (``LoraRef``s) written after it as tags: where only the prompt's
    tags are read (A1111's infotext, the Generate form), the list would be lost."""
    return " ".join([prompt.rstrip(), *(ref.tag() for ref in loras)]).strip()


def _number(tag: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TagError(f"{tag}: {text!r} is not a number (write <lora:name:weight> or "
                       "<lora:name:te_weight:unet_weight>)") from None
    if not math.isfinite(value) or abs(value) > MAX_WEIGHT:
        raise TagError(f"{tag}: weight {text} is out of range (-{MAX_WEIGHT:g} to {MAX_WEIGHT:g})")
    return value


def parse_tag(tag: str, args: str) -> LoraRef:
    """``args`` is what follows ``lora:`` inside the brackets of ``tag``."""
    items = args.split(":")
    name = items[0].strip()
    if not name:
        raise TagError(f"{tag}: the LoRA name is empty (write <lora:name:weight>)")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items[1:]:
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip().lower()] = value.strip()
        else:
            positional.append(item.strip())
    if len(positional) > 3:
        raise TagError(f"{tag}: too many values (at most <lora:name:te_weight:unet_weight:dyn>)")
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise TagError(f"{tag}: unknown option {unknown[0]!r} (valid: te=, unet=, dyn=)")
    te = _number(tag, positional[0]) if positional else 1.0
    unet = _number(tag, positional[1]) if len(positional) > 1 else te
    if "te" in named:
        te = _number(tag, named["te"])
    if "unet" in named:
        unet = _number(tag, named["unet"])
    if len(positional) > 2 or "dyn" in named:
        _number(tag, named.get("dyn", positional[2] if len(positional) > 2 else "0"))  # accepted, not applied
    return LoraRef(name, weight=unet, te_weight=None if te == unet else te)


def prompt_loras(*prompts: str) -> list[LoraRef]:
    """The LoRAs the prompts' tags ask for, in order of appearance (raises ``TagError``)."""
    return [parse_tag(m.group(0), m.group(2)) for text in prompts for m in TAG.finditer(text)]


def strip_tags(text: str) -> str:
    """The prompt the text encoder sees: tags removed (what A1111 does), text otherwise untouched."""
    return TAG.sub("", text) if "<" in text else text


def ref_from_value(index: int, value: Any) -> LoraRef:
    """One entry of a request's ``loras`` list: a table ``{name, weight = 1.0, te_weight}`` (or a
    ``LoraRef``). Raises ``ValueError`` with what is wrong; the request names the field."""
    if isinstance(value, LoraRef):
        value = {"name": value.name, "weight": value.weight, "te_weight": value.te_weight}
    if not isinstance(value, dict):
        raise ValueError("a table with name, weight and optionally te_weight")
    unknown = sorted(set(value) - {"name", "weight", "te_weight"}, key=str)
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a LoRA entry key (valid: name, weight, te_weight)")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name: the LoRA's file name (without extension) is required")
    numbers = {}
    for key in ("weight", "te_weight"):
        number = value.get(key, 1.0 if key == "weight" else None)
        if number is None:
            numbers[key] = None
            continue
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) or (
            abs(number) > MAX_WEIGHT
        ):
            raise ValueError(f"{key}: a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, not {number!r}")
        numbers[key] = float(number)
    return LoraRef(name.strip(), numbers["weight"], numbers["te_weight"])
