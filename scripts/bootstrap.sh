#!/usr/bin/env bash
# Creates .venv on first use and (re)installs Darkroom when pyproject.toml changes.
# Usage: scripts/bootstrap.sh [extra]   (extra: "test" adds the test/reference dependencies)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DARKROOM_VENV:-$root/.venv}"
extra="${1:-}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "darkroom: creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)

stamp="$venv/.darkroom-installed${extra:+-$extra}"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    # Prefer a locally provided CPU build (CI and dev boxes ship torch 2.13.0+cpu as a wheel on disk,
    # found through pip's find-links); anywhere else let pip pick the normal (CUDA) build.
    probe="$(mktemp -d)"
    if "${pip[@]}" download --no-deps --no-index -d "$probe" "torch==2.13.0" >/dev/null 2>&1; then
        echo "darkroom: installing the local torch 2.13.0 build" >&2
        "${pip[@]}" install "$probe"/torch-*.whl 2> >(grep -v "is ignored: it is neither" >&2)
    else
        echo "darkroom: installing torch (first run only, this can take a while)" >&2
        "${pip[@]}" install torch
    fi
    rm -rf "$probe"
fi
echo "darkroom: installing dependencies${extra:+ [$extra]}" >&2
"${pip[@]}" install -e "$root${extra:+[$extra]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
if [ "$extra" = "test" ]; then
    # The upscaler tests need spandrel (the `upscale` extra) but not the torchvision it declares: a PyPI torchvision
    # does not import beside a CPU torch build, and one that matches would pull a CUDA torch in. The tests put a
    # stand-in torchvision on the path when no real one imports (tests/spandrel_env.py).
    "${pip[@]}" install --no-deps "spandrel>=0.4" einops
fi
echo "$want" > "$stamp"
