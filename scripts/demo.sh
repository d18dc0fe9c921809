#!/usr/bin/env bash
# The main job: the vlr_face pipeline end to end on the embedded default (kfp local runner,
# local folder store, local Triton), on synthetic faces unless --data DIR is given.
# Extra arguments go to `faceops run vlr_face` (see `faceops run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/faceops run vlr_face "$@"
