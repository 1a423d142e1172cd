"""The registry of model families: every module in this package that defines ``FAMILY``.

Adding a family is adding one module here (plus its tests): nothing else lists families. Modules whose name
starts with ``_`` hold shared pieces and are skipped. Imports no torch (see ``core.models.family``).
"""

from __future__ import annotations

import importlib
import pkgutil

from core.errors import RequestError
from core.models.family import ModelFamily


def _discover() -> dict[str, ModelFamily]:
    found: list[ModelFamily] = []
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, ModelFamily):
            raise TypeError(f"{module.__name__} defines no FAMILY = ModelFamily(...)")
        if family.name != module_info.name:
            raise ValueError(f"{module.__name__} defines family {family.name!r}; name the module after it")
        found.append(family)
    found.sort(key=lambda f: (f.order, f.name))
    return {f.name: f for f in found}


FAMILIES: dict[str, ModelFamily] = _discover()


def get_family(name: str) -> ModelFamily:
    """The family ``name``; a ``RequestError`` listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise RequestError("model family", name, "one of " + ", ".join(FAMILIES)) from None


def runnable() -> list[ModelFamily]:
    return [f for f in FAMILIES.values() if f.runnable]


def by_detect_priority() -> list[ModelFamily]:
    return sorted(FAMILIES.values(), key=lambda f: -f.detect_priority)


__all__ = ["FAMILIES", "ModelFamily", "by_detect_priority", "get_family", "runnable"]
