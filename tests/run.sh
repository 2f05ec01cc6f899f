#!/usr/bin/env bash
# The test command: sets up .venv (CPU torch) and runs the whole pytest suite on CPU; the 15 slowest
# tests are listed at the end (--durations=15 in pyproject.toml's addopts) so a slow new test shows.
# Two pytest-xdist workers of one thread each, a test file per worker (module fixtures such as the
# compiled FP8 model stay shared): on a 2-core AMD EPYC 5m48s instead of 9m33s for one process of two
# threads, because compiling and subprocess start-up are single-threaded (dev/LOG.md, 2026-11-30).
# Extra arguments go to pytest, e.g. bash tests/run.sh -k dataloader -x  (or -n 0 for one process)
set -euo pipefail
cd "$(dirname "$0")/.."
# Bytecode is written as the suite imports, under .venv/pycache, even where PYTHONDONTWRITEBYTECODE=1: only
# what the tests import is compiled, once, instead of all of site-packages at install (dev/LOG.md, 2026-12-03).
export PYTHONPYCACHEPREFIX="$PWD/.venv/pycache"
unset PYTHONDONTWRITEBYTECODE
source scripts/setup_venv.sh cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -n "${NANOCHAT_TEST_WORKERS:-2}" --dist loadfile "$@"
