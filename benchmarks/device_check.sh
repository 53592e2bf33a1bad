#!/usr/bin/env bash
# GPU check (issue 15): every method merged through `mergekit-yaml --cuda` and on the
# CPU, outputs compared; one table in benchmarks/results/speed-device-check.md.
#   benchmarks/device_check.sh              # 1B, T = 2, ~10 minutes on an H200 machine (16 cores)
#   SIZE=0.1B T=4 benchmarks/device_check.sh
# Extra arguments go to benchmarks/device_check.py (--methods ..., --threads N).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec timeout "${LIMIT_S:-570}" python benchmarks/device_check.py --size "${SIZE:-1B}" --T "${T:-2}" --timeout "${MERGE_TIMEOUT_S:-240}" "$@"
