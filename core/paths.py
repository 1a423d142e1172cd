"""Where Darkroom keeps its data, config and outputs.

``DARKROOM_HOME`` (used by the tests) puts everything under one folder; otherwise platformdirs decides.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "darkroom"


def _home() -> Path | None:
    value = os.environ.get("DARKROOM_HOME")
    return Path(value).expanduser() if value else None


def data_dir(create: bool = True) -> Path:
    """Database and default outputs (``create=False``: only its name, as ``--help`` shows it)."""
    home = _home()
    path = home / "data" if home else Path(platformdirs.user_data_dir(APP_NAME))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def config_dir(create: bool = True) -> Path:
    """User presets and last-used settings (``create=False``: only its name)."""
    home = _home()
    path = home / "config" if home else Path(platformdirs.user_config_dir(APP_NAME))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def default_output_dir() -> Path:
    return data_dir() / "outputs"


def default_models_dir() -> Path:
    """Created with the data folder: the no-models screen tells a new user to copy a checkpoint into it, and
    a folder that is not there read as a typo ("no such folder: check the path")."""
    path = data_dir() / "models"
    path.mkdir(exist_ok=True)
    return path


def database_path() -> Path:
    return data_dir() / "darkroom.sqlite3"


def unrecordable_name(path: Path | str) -> str | None:
    """Why images saved under ``path`` could not be recorded, or None. The job database keeps paths as UTF-8
    text; a folder named in another encoding (b'caf\\xe9', from a latin-1 system or an old archive) reads as
    lone surrogates, which SQLite refuses: the worker failed to claim each job, again and again, and the run
    never ended."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return ("its name is not UTF-8 text, and the job database records image paths as text: rename the "
                "folder or choose another")
    return None
