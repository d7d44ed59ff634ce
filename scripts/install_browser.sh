#!/usr/bin/env bash
# Install what tests/test_browser.py needs, idempotently: $CHROMIUM when set, else a Chromium on PATH, else
# Debian's `chromium` (apt-get; as root, or with sudo). The driver (scripts/browser_check.py) speaks the DevTools protocol over aiohttp, which ComfyUI
# already requires, so nothing else is installed and no browser build is downloaded.
set -euo pipefail

log() { printf '\033[1m[browser]\033[0m %s\n' "$*"; }

if [ -n "${CHROMIUM:-}" ]; then  # the browser test uses this one (scripts/browser_check.py)
  command -v "$CHROMIUM" >/dev/null 2>&1 || { echo "[browser] CHROMIUM=$CHROMIUM is not an executable" >&2; exit 1; }
  log "using CHROMIUM=$(command -v "$CHROMIUM")"
  exit 0
fi
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then
    log "found $(command -v "$name")"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "[browser] no Chromium and no apt-get: install Chromium yourself, or set CHROMIUM=/path/to/chrome" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
log "installing Debian's chromium"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null 2>&1 || { echo "[browser] apt-get finished but chromium is not on PATH" >&2; exit 1; }
log "installed $(command -v chromium)"
