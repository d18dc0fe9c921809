#!/usr/bin/env bash
# Create or update the repo's virtual environment (.venv) with faceops and the given extras.
# Idempotent: re-installs only when pyproject.toml (or the extras) changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-all}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[faceops] creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.faceops-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[faceops] installing faceops[$EXTRAS] into .venv (torch first: about 2 minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]" 2>&1 | grep -vE "is ignored|^WARNING: Location" || true
  .venv/bin/python -c "import faceops, torch" || { echo "[faceops] install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
