#!/usr/bin/env bash
# The test suite, as CI runs it: installs what it needs (the locked venv; promtool, the Prometheus
# servers and chromium from Debian when running as root), then runs pytest (slow tests included).
# Any install that fails stops the run. pytest then fails the run when a test is skipped for any
# reason but "needs a CUDA device", without ../shared/data "needs real data", or, when not root,
# "needs chromium" (tests/skip_budget.py).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
if ! command -v promtool >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[faceops] installing prometheus + pushgateway (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus prometheus-pushgateway >/dev/null
  else
    echo "[faceops] promtool/prometheus-pushgateway are missing: as root this script installs them" \
         "(apt-get install prometheus prometheus-pushgateway); their tests will fail the skip budget" >&2
  fi
fi
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[faceops] installing chromium (Debian package; the report's browser test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "[faceops] chromium is missing: as root this script installs it (apt-get install chromium);" \
         "the report's browser test skips (allowed only when not root)" >&2
  fi
fi
export PATH="$PWD/.venv/bin:$PATH"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
