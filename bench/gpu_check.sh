#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): it/s and peak VRAM of Darkroom next to diffusers for SD1.5 at 512 and
# SDXL at 1024 on one CUDA GPU, every attention backend and precision, with and without compile and caching.
# Finishes in under 8 minutes (a 450 s budget inside, a hard 470 s limit here); without a CUDA device it says
# so and exits 0. Not used by the tests. Extra arguments go to gpu_check.py (--only sd15, --no-diffusers, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in .venv/bin/python ../main/.venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ]; then python="$candidate"; break; fi
  done
fi
status=0
timeout --signal=INT --kill-after=10 470 "$python" bench/gpu_check.py "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 130 ]; then
  echo "gpu_check: stopped at the 8-minute limit (what is above was measured)" >&2
fi
exit "$status"
