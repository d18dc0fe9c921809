#!/usr/bin/env bash
# Refresh constraints.txt, the one lock file: resolve faceops[all] from pyproject.toml's ranges in a
# throw-away venv (today's newest releases) and freeze every installed distribution, pip and
# setuptools included; then bring .venv to the new lock and recompile the checked-in pipelines with
# the locked kfp. Review and test:  bash scripts/lock.sh && bash scripts/test.sh && git diff
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip setuptools
"$tmp/venv/bin/python" -m pip install -q -e ".[all]"
{
  echo "# faceops lock: every direct and transitive dependency of faceops[all], exact versions."
  echo "# Used by scripts/venv.sh (pip install --no-deps -r), CI and images/*/Dockerfile (pip install -c)."
  echo "# Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())')."
  echo "# Refresh: bash scripts/lock.sh   (also updates .venv and recompiles pipelines/*.yaml)"
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^faceops' | LC_ALL=C sort -f
} > constraints.txt
echo "[faceops] constraints.txt: $(grep -vc '^#' constraints.txt) pinned distributions"
bash scripts/venv.sh
for name in vlr_face arcface_resnet34; do
  env -u FACEOPS_IMAGE_REGISTRY -u FACEOPS_IMAGE_TAG \
    .venv/bin/faceops compile "$name" --cluster configs/cluster_gpu.yaml -o "pipelines/$name.yaml"
done
