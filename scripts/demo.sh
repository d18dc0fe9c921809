#!/usr/bin/env bash
# The main job: the vlr_face pipeline end to end on the embedded default (kfp local runner,
# local folder store, local Triton), on synthetic faces unless --data DIR is given.
# It prints one line per step as it starts and ends (with the step's key figures), then where the
# report, metrics, checkpoints, model repository and logs are; the runner's whole output goes to
# <out>/logs/kfp.log (-v shows it on the console as well).
# Extra arguments go to `faceops run vlr_face` (see `faceops run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/faceops run vlr_face "$@"
