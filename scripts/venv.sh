#!/usr/bin/env bash
# Create or update the repo's virtual environment (.venv): exactly the versions in constraints.txt
# (the lock), then faceops itself, editable. Re-installs only when pyproject.toml or the lock changed.
# Any failure stops here with pip's own message: a venv is stamped only once it matches the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
stamp=".venv/.faceops-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
# The locked torch is a CUDA build: the venv takes about 6 GB and pip unpacks through TMPDIR. A full
# disk would otherwise stop pip half-way with "[Errno 28] No space left on device" and a torn venv.
need_gb="${FACEOPS_VENV_MIN_FREE_GB:-8}"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  tmp="${TMPDIR:-/tmp}"
  [ -d "$tmp" ] || tmp=/tmp  # as Python's tempfile (and so pip) falls back
  for dir in . "$tmp"; do
    if ! free_gb=$("$PY" -c 'import shutil, sys; print(shutil.disk_usage(sys.argv[1]).free >> 30)' "$dir"); then
      echo "[faceops] cannot read the free space of $dir" >&2
      exit 1
    fi
    if [ "$free_gb" -lt "$need_gb" ]; then
      echo "[faceops] $(cd "$dir" && pwd) has ${free_gb} GB free; installing the locked venv needs about" \
           "${need_gb} GB there: free some space (old clones, .venv copies, /tmp/pytest-of-$(id -un))," \
           "point TMPDIR at a larger disk, or set FACEOPS_VENV_MIN_FREE_GB if you know it needs less" >&2
      exit 1
    fi
  done
  if [ ! -x .venv/bin/python ]; then
    echo "[faceops] creating .venv"
    "$PY" -m venv .venv
  fi
  rm -f "$stamp"
  echo "[faceops] installing the locked dependencies into .venv (torch first: about 3 minutes on a fresh machine)"
  pip=(.venv/bin/python -m pip --disable-pip-version-check --no-cache-dir)  # no GB-sized wheel cache
  quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }  # this machine's pip.conf
  # --no-deps: the lock is the whole environment; a package missing from it fails the check below.
  quiet "${pip[@]}" install -q --no-deps -r constraints.txt
  rm -rf ./*.egg-info  # a stale one in the checkout shadows the new metadata (extras) for importlib
  # PYTHONWARNINGS: setuptools' generic "editable installation" banner, not an error
  PYTHONWARNINGS=ignore quiet "${pip[@]}" install -q --no-deps --no-build-isolation -e . >/dev/null
  "${pip[@]}" check
  .venv/bin/python scripts/check_lock.py
  echo "$want" > "$stamp"
fi
