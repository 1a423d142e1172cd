"""Import torch from a background thread without freezing the process's other threads.

The worker imports torch on its own thread so the terminal UI can paint at once, but a plain ``import torch``
still stalls every other Python thread for long stretches, because it holds the GIL through:

* ``dlopen`` of libtorch_cpu (and libtorch_cuda on CUDA builds): its static initialisers register thousands
  of operators, ~200 ms here. Calling ``dlopen`` ourselves through ctypes releases the GIL for that call (ctypes
  releases it around every foreign call); torch's own import then finds the libraries already loaded.
* full garbage collections triggered by the import's hundreds of thousands of new objects (~50 ms each),
  which free nothing: collection is paused for the import and the new objects are frozen afterwards.

Measured on a 2-core CPU box (a 5 ms sleeper on another thread): the longest stall went from ~200-390 ms to
~20-35 ms. Everything here is best effort: if a library cannot be preloaded, torch's import loads it as usual.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

# Load order matters: each library's dependencies first, as torch's own import would load them.
_LIBRARIES = ("libtorch_global_deps", "libc10", "libtorch_cpu", "libc10_cuda", "libtorch_cuda", "libtorch",
              "libtorch_python")
_lock = threading.Lock()


def torch_library_paths() -> list[Path]:
    """The shared libraries of the installed torch, in load order (empty where torch or the files are missing)."""
    if sys.platform == "win32":
        return []  # ctypes.CDLL(None) has no dlopen to call on Windows; the plain import is used there
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.origin is None:
        return []
    lib_dir = Path(spec.origin).parent / "lib"
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return [lib_dir / f"{name}{suffix}" for name in _LIBRARIES if (lib_dir / f"{name}{suffix}").is_file()]


def preload_torch_libraries() -> int:
    """``dlopen`` torch's libraries with the GIL released; returns how many loaded."""
    paths = torch_library_paths()
    if not paths:
        return 0
    try:
        dlopen = ctypes.CDLL(None).dlopen
    except (OSError, AttributeError):
        return 0
    dlopen.restype = ctypes.c_void_p
    dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    flags = os.RTLD_NOW | os.RTLD_GLOBAL  # torch loads its global deps RTLD_GLOBAL too
    loaded = 0
    for path in paths:
        if dlopen(os.fsencode(path), flags):
            loaded += 1
        else:
            break  # a missing dependency: let torch's own import load the rest (and report any error)
    return loaded


def import_torch() -> ModuleType:
    """``import torch``, gently for the other threads (see the module docstring). Safe to call from several
    threads; the first does the work, the others wait for it."""
    module = sys.modules.get("torch")
    if module is not None:
        return module
    with _lock:
        module = sys.modules.get("torch")
        if module is not None:
            return module
        preload_torch_libraries()
        collecting = gc.isenabled()
        gc.disable()
        try:
            import torch
        finally:
            if collecting:
                # torch's modules live until the process exits: move them out of the collector's reach so later
                # full collections do not walk them again, then collect as before.
                gc.freeze()
                gc.enable()
        return torch
