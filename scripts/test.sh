#!/usr/bin/env bash
# The whole test suite: setup (idempotent), ruff lint + format check, the 100-prompt API soak (in CI or with
# SOAK=1), then pytest (unit, parity, real-ComfyUI integration, browser). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
PY="${VENV:-$PWD/.venv}/bin/python"
echo "[test] ruff check + format check"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
if [ "${CI:-}" = "true" ] || [ -n "${SOAK:-}" ]; then
  # The 100-prompt API soak (minutes): in CI, or when asked with SOAK=1; figures in artifacts/soak.json.
  echo "[test] API soak (100 prompts)"
  mkdir -p artifacts
  "$PY" scripts/soak.py --prompts 100 --json artifacts/soak.json
fi
echo "[test] pytest"
exec "$PY" -m pytest -q -p no:cacheprovider -m "not soak" "$@"
