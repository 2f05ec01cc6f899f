#!/usr/bin/env bash
# The test command: sets up .venv (CPU torch) and runs the whole pytest suite on CPU; the 15 slowest
# tests are listed at the end (--durations=15 in pyproject.toml's addopts) so a slow new test shows.
# Extra arguments go to pytest, e.g. bash tests/run.sh -k dataloader -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_venv.sh cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest "$@"
