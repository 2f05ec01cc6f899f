#!/usr/bin/env bash
# Creates .venv (if missing) and installs nanochat with the right torch for this machine.
# Sourced by tests/run.sh and speedrun.sh; usage: source scripts/setup_venv.sh [cpu|auto]
#   cpu  : always the CPU build of torch (tests never need CUDA)
#   auto : the CUDA build plus flash-attn when an NVIDIA GPU is visible, else the CPU build
# The CPU build is pinned (torch==2.13.0) so a CPU-only box never downloads a multi-GB CUDA build:
# first the local "+cpu" wheel (find-links), else PyTorch's CPU index.
set -euo pipefail
_want=${1:-auto}
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_py=${PYTHON:-python3}
[ -x "$_root/.venv/bin/python" ] || "$_py" -m venv "$_root/.venv"
_pip="$_root/.venv/bin/python -m pip install -q --disable-pip-version-check"
if [ "$_want" = auto ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $_pip "torch==2.13.0"
    $_pip -e "$_root[dev]"
    # prebuilt FA3 kernels fetched from the HF hub at first use (a source build of flash-attn takes
    # an hour); without them attention falls back to SDPA, and base_train/preflight say so
    $_pip "kernels" || echo "setup_venv: 'kernels' did not install; attention will use SDPA"
else
    $_pip "torch==2.13.0+cpu" 2>/dev/null || $_pip "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    $_pip -e "$_root[dev]"
fi
export PATH="$_root/.venv/bin:$PATH"
