#!/usr/bin/env bash
# The main job: the vlr_face pipeline end to end on the embedded default (kfp local runner,
# local folder store, local Triton), on synthetic faces unless --data DIR is given.
# It prints one line per step as it starts and ends (with the step's key figures), then where the
# report, metrics, checkpoints, model repository and logs are; the runner's whole output goes to
# <out>/logs/kfp.log (-v shows it on the console as well).
# With --data DIR (one sub-folder per person) and no --config, the config is configs/demo_lfw.yaml:
# the same budgets for real LFW-style faces (250x250 centre-cropped, people with 8+ images train).
# Extra arguments go to `faceops run vlr_face` (see `faceops run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
data=0 config=0
for arg in "$@"; do
  case "$arg" in
    --data|--data=*) data=1 ;;
    --config|--config=*) config=1 ;;
  esac
done
if (( data && !config )); then
  set -- --config configs/demo_lfw.yaml "$@"
fi
exec .venv/bin/faceops run vlr_face "$@"
