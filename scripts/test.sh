#!/usr/bin/env bash
# The whole test suite: setup (idempotent), ruff lint + format check, then pytest (unit, parity,
# real-ComfyUI integration, browser). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY="${VENV:-$PWD/.venv}/bin/python"
echo "[test] ruff check + format check"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
echo "[test] pytest"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
