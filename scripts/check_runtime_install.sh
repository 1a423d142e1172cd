#!/usr/bin/env bash
# Proves that a user's install works: a fresh virtual environment with Darkroom's runtime dependencies only
# (what ./darkroom installs; no test extra, so no diffusers/transformers/numpy unless a runtime dependency
# brings them) generates an image with --batch from a tiny random checkpoint. Run by .ci/run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="$work/venv"

echo "runtime-install check: fresh environment in $venv" >&2
DARKROOM_VENV="$venv" "$root/scripts/bootstrap.sh"
py="$venv/bin/python"

# The environment really is the user's: no test-only package is importable.
"$py" - <<'PY'
import importlib.util
leaked = [name for name in ("pytest", "diffusers", "transformers") if importlib.util.find_spec(name)]
if leaked:
    raise SystemExit(f"runtime-install check: test-only packages present: {leaked}")
PY

cd "$work"
"$py" -c "from core.models.testing import write_random_checkpoint as w; w('models/tiny.safetensors', 'sd15', 'tiny')"
cat > jobs.toml <<'TOML'
[[job]]
model = "tiny"
prompt = "a lighthouse at dusk"
seed = 7
steps = 2
width = 64
height = 64
TOML
DARKROOM_HOME="$work/home" "$venv/bin/darkroom" --batch jobs.toml --models-dir models --output-dir out \
    >paths.txt 2>stderr.txt || { cat stderr.txt >&2; echo "runtime-install check: --batch failed" >&2; exit 1; }
if grep -q "Traceback\|Warning" stderr.txt; then
    cat stderr.txt >&2
    echo "runtime-install check: --batch printed a traceback or warning" >&2
    exit 1
fi
"$py" - "$(cat paths.txt)" <<'PY'
import sys
from PIL import Image
path = sys.argv[1]
with Image.open(path) as image:
    image.load()
    assert image.size == (64, 64), image.size
    assert "Seed: 7" in image.info.get("parameters", ""), image.info
print(f"runtime-install check: ok, generated {path} with runtime dependencies only", file=sys.stderr)
PY
