#!/usr/bin/env bash
# Creates .venv (if missing) and installs nanochat with the right torch for this machine.
# Sourced by tests/run.sh and speedrun.sh; usage: source scripts/setup_venv.sh [cpu|auto]
#   cpu  : always the CPU build of torch (tests never need CUDA)
#   auto : with an NVIDIA GPU visible, a CUDA torch that the hub's prebuilt FA3 has a build for, plus
#          `kernels` to fetch it; else the CPU build
# The CPU build is pinned (torch==2.13.0) so a CPU-only box never downloads a multi-GB CUDA build:
# first the local "+cpu" wheel (find-links), else PyTorch's CPU index.
# On a GPU node scripts/torch_choice.py picks the torch: the venv's own CUDA torch is kept when FA3
# has a build for it; else torch 2.13.0 for CUDA 13.0 (PyPI) or, on a driver of CUDA 12.x, 12.6.
# NANOCHAT_KEEP_TORCH=1 before the venv exists builds it on the node's python packages
# (--system-site-packages) to keep the node's own torch, and stops if that torch does not qualify.
set -euo pipefail
_want=${1:-auto}
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_py=${PYTHON:-python3}
_venv_flags=""
[ "${NANOCHAT_KEEP_TORCH:-0}" = 1 ] && [ "$_want" = auto ] && _venv_flags="--system-site-packages"
[ -x "$_root/.venv/bin/python" ] || "$_py" -m venv $_venv_flags "$_root/.venv"
_pip="$_root/.venv/bin/python -m pip install -q --disable-pip-version-check"
# _install: pip install "$@" through uv: a fresh CPU venv in 78 s where pip takes 3 min 26 s on a 2-core AMD
# EPYC (dev/LOG.md, 2026-12-02). --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE=1 nothing
# writes .pyc files later, and every process then imports torch from source (the suite took 1.8x as long).
# Not where PYTHONPYCACHEPREFIX is set: Python then reads bytecode only from that tree, so compiling all of
# site-packages would be wasted (a fresh venv: 47.7 s with it, 22.8 s without, farm-bench medians on a 2-core
# Zen 3 EPYC, dev/LOG.md 2026-12-03); tests/run.sh sets it.
# uv does not read pip's configuration, so the find-links, indexes, constraints and CA bundle pip is
# configured with are passed on (unsafe-best-match: the best version across them, as pip picks it).
# Without uv (it did not install) or if uv fails, pip does it.
_bytecode=--compile-bytecode
[ -n "${PYTHONPYCACHEPREFIX:-}" ] && _bytecode=""
_install() {
    if [ -x "$_root/.venv/bin/uv" ] || $_pip uv >/dev/null 2>&1; then
        local _flags=() _key _value _v
        while read -r _key _value; do
            case $_key in
                find-links|extra-index-url|index-url|constraint) for _v in $_value; do _flags+=("--$_key" "$_v"); done ;;
                cert) export SSL_CERT_FILE=$_value ;;
            esac
        done < <("$_root/.venv/bin/python" -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.\([a-z-]*\)='\(.*\)'$/\1 \2/p")
        "$_root/.venv/bin/uv" pip install -q $_bytecode --python "$_root/.venv/bin/python" --index-strategy unsafe-best-match \
            ${_flags[@]+"${_flags[@]}"} "$@" && return
    fi
    $_pip "$@"
}
if [ "$_want" = auto ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    _torch=$("$_root/.venv/bin/python" "$_root/scripts/torch_choice.py")  # says why on stderr; set -e stops on a refusal
    if [ "$_torch" != keep ]; then
        # a CPU build of the same version would satisfy torch==2.13.0 and stay: remove the venv's torch first
        "$_root/.venv/bin/python" -m pip uninstall -y -q torch >/dev/null 2>&1 || true
        $_pip $_torch  # pip, not _install: uv picking across the configured indexes could take a CPU build of that version
    fi
    _install -e "$_root[dev,hf]"
    # prebuilt FA3 fetched from the HF hub at first use (a source build of flash-attn takes an hour).
    # Pinned: kernels >= 0.15 needs the kernel version nanochat/attention.py passes, 0.17 resolves the
    # stable-ABI builds. Without it attention falls back to SDPA, and base_train/preflight say what that costs.
    $_pip "kernels==0.17.2" || echo "setup_venv: 'kernels' did not install; attention will use SDPA"
else
    _install "torch==2.13.0+cpu" 2>/dev/null || _install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    _install -e "$_root[dev,hf]"  # hf: transformers + lm-eval, so the export and lm-eval tests run too
fi
export PATH="$_root/.venv/bin:$PATH"
