#!/usr/bin/env bash
# The test suite, as CI runs it: installs what it needs (venv + faceops[all]; promtool and the
# Prometheus servers from Debian when running as root), then runs pytest (slow tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh all
if ! command -v promtool >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[faceops] installing prometheus + pushgateway (Debian packages)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends prometheus prometheus-pushgateway >/dev/null || \
      echo "[faceops] could not install prometheus: its tests will be skipped"
  fi
fi
export PATH="$PWD/.venv/bin:$PATH"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
