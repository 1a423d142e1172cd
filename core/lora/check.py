"""A LoRA checked against a checkpoint from the two files' headers alone (stdlib only, no tensors read).

The batch runner calls this before any job runs, so a LoRA made for another family is one error up front and
unmatched keys are a warning beside the prompt-syntax ones; the pipeline makes the same checks on the loaded
model (``core.lora.patch``) with the same messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from core.lora import LoraError
from core.lora.detect import family_mismatch, lora_family
from core.lora.keymap import Target, weight_modules
from core.lora.names import group_keys, module_kind


def unmatched_warning(name: str, unmatched: int, total: int, examples: list[str], model_label: str) -> str:
    example = ", ".join(repr(k) for k in examples[:2])
    return (f"LoRA {name!r}: {unmatched} of {total} keys match no layer of the {model_label} model and were "
            f"skipped (e.g. {example})")


def nothing_matched(path: object, name: str, total: int, example: str, model_label: str) -> LoraError:
    return LoraError(
        f"{path}: none of LoRA {name!r}'s {total} keys match a layer of this {model_label} model (e.g. "
        f"{example!r}); it is not a {model_label} LoRA, or its format is not supported"
    )


def match_counts(shapes: Mapping[str, tuple[int, ...]], table: Mapping[str, Target]) -> tuple[int, int, list[str]]:
    """(modules matched, keys unmatched, example unmatched names) of a LoRA's keys against a key map."""
    grouped, stray = group_keys(shapes)
    matched, unmatched, examples = 0, len(stray), list(stray[:2])
    for module, parts in grouped.items():
        if module_kind(parts) is not None and module in table:
            matched += 1
        else:
            unmatched += len(parts)
            examples.append(module)
    return matched, unmatched, examples


def check_lora(lora_path: str | Path, checkpoint_path: str | Path, name: str, model: str) -> list[str]:
    """Warnings (unmatched keys) for using this LoRA with this checkpoint; raises ``LoraError`` for a LoRA of
    another family or one that matches nothing. Files it cannot read as safetensors headers are left to the
    loader, which names their problem."""
    from core.errors import CheckpointError
    from core.models.detect import inspect_header
    from core.models.families import FAMILIES
    from core.models.family import resolve
    from core.models.safetensors_header import read_header

    try:
        header = read_header(lora_path)
        info = inspect_header(checkpoint_path)
    except (CheckpointError, OSError, ValueError):
        return []
    family = FAMILIES.get(info.family)
    if family is None:
        return []
    shapes = header.shapes
    found, evidence = lora_family(shapes)
    error = family_mismatch(found, evidence, family.name, name, lora_path, model)
    if error is not None:
        raise error
    if not family.lora_keys:
        raise LoraError(f"LoRAs are not supported for {family.label} models yet")
    modules = {role: weight_modules(info.component_keys.get(role, ()), prefix)
               for role, prefix in info.prefixes.items()}
    matched, unmatched, examples = match_counts(shapes, resolve(family.lora_keys)(modules))
    if matched == 0:
        raise nothing_matched(lora_path, name, len(shapes), examples[0] if examples else "", family.label)
    return [unmatched_warning(name, unmatched, len(shapes), examples, family.label)] if unmatched else []
