"""Where a session setting comes from (the ``*_mode`` modules beside this one), without importing torch."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping


def resolve_choice(
    value: str | None, flag: str, env_var: str, check: Callable[[str, str], str], default: str,
    env: Mapping[str, str] | None = None,
) -> str:
    """``value`` (the command line's ``flag``) when given, else ``$env_var``, else ``default``; a given value is
    normalised or refused by ``check(value, where it came from)``."""
    if value:
        return check(value, flag)
    env = os.environ if env is None else env
    from_env = env.get(env_var, "").strip()
    return check(from_env, f"${env_var}") if from_env else default
