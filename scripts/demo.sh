#!/usr/bin/env bash
# Set everything up and run the main job: queue the shipped Open-Sora 1.3 text-to-video workflow on a
# real headless ComfyUI with the small embedded default model; the mp4 lands in ./output/.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --no-browser
exec "${VENV:-$PWD/.venv}/bin/python" scripts/demo.py "$@"
