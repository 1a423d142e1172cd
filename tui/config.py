"""Last-used settings of the terminal app (a small JSON file in the config folder).

Only plain request fields and UI choices are stored; anything unreadable is ignored so a bad file can never
stop the app from starting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SETTINGS_FILE = "tui-settings.json"


def settings_path() -> Path:
    from core.paths import config_dir

    return config_dir() / SETTINGS_FILE


def load_settings(path: Path | None = None) -> dict[str, Any]:
    """The saved settings, or an empty dict when there are none or the file is unreadable."""
    path = path or settings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(values: dict[str, Any], path: Path | None = None) -> None:
    """Write atomically (temp file + rename) so a crash mid-write keeps the previous settings."""
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
