"""Which torch a GPU node's .venv gets: one the hub's FA3 has a build for, in a CUDA the driver runs.

    python scripts/torch_choice.py     # stdout: 'keep' or the pip arguments; stderr: why; exit 1: refuse

It takes no options (--help prints this text and decides nothing); NANOCHAT_KEEP_TORCH=1 asks to keep the
venv's torch, and fails when that torch does not qualify.

scripts/setup_venv.sh runs it with the venv's python before installing anything, so it imports
only the standard library (and torch, if one is importable, to read its version).

Facts it encodes (dev/LOG.md, 2026-11-30 "which torch on a GPU node", with where each was read):
- `kernels-community/flash-attn3` version 1 publishes for x86_64-linux Torch stable-ABI builds
  `torch-stable-abi29-cu126/cu128/cu130` (they load on any torch >= 2.9) besides per-torch builds
  (torch210/211 cu128+cu130, torch212 cu130). The kernels loader takes a build whose CUDA major
  equals torch's and whose minor is not newer, stable-ABI builds first.
- torch 2.13.0 on PyPI (Linux) is built for CUDA 13.0, which needs a driver that runs CUDA 13;
  PyTorch's own index has a CUDA 12.6 build of it (2.12-2.14 ship 12.6 legacy, 13.0, 13.2; no 12.8).
"""

import argparse
import os
import re
import subprocess
import sys

PINNED_TORCH = "2.13.0"
FA3_MIN_TORCH = (2, 9)
FA3_STABLE_ABI_CUDA = [(12, 6), (12, 8), (13, 0)]  # CUDA versions of the torch-stable-abi29 builds
CUDA12_INDEX = "https://download.pytorch.org/whl/cu126"  # torch 2.13.0+cu126, for drivers of CUDA 12.x


def parse_version(text):
    """'2.9.1+cu128' -> (2, 9); '12.8' -> (12, 8); None or junk -> None."""
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def fa3_build(torch_version, cuda_version):
    """Name of the FA3 v1 build the kernels loader would pick for this torch, or None."""
    if torch_version is None or cuda_version is None or torch_version < FA3_MIN_TORCH:
        return None
    fits = [c for c in FA3_STABLE_ABI_CUDA if c[0] == cuda_version[0] and c[1] <= cuda_version[1]]
    if not fits:
        return None
    major, minor = max(fits)
    return f"torch-stable-abi29-cu{major}{minor}-x86_64-linux"


def why_not_kept(existing, driver_cuda):
    """Why an existing torch (torch_version, cuda_version or None) does not qualify, or None if it does."""
    if existing is None:
        return "no torch is importable"
    torch_version, cuda_version = existing
    if cuda_version is None:
        return "the torch found is a CPU build"
    if torch_version < FA3_MIN_TORCH:
        return f"torch {torch_version[0]}.{torch_version[1]} is older than 2.9, the oldest FA3 v1 build"
    if fa3_build(torch_version, cuda_version) is None:
        return f"torch is built for CUDA {cuda_version[0]}.{cuda_version[1]}: FA3 v1 has builds for CUDA >= 12.6 only"
    if driver_cuda is not None and cuda_version[0] > driver_cuda[0]:
        return f"torch is built for CUDA {cuda_version[0]}.x and the driver runs CUDA {driver_cuda[0]}.{driver_cuda[1]}"
    return None


def choose_torch(existing, driver_cuda, keep_requested):
    """(action, pip_args, reason); action is 'keep', 'install' or 'refuse'.

    existing: (torch_version, cuda_version) of the torch the venv imports (cuda_version None for a CPU
    build), or None. driver_cuda: the newest CUDA the driver runs (nvidia-smi's header), or None.
    A torch that qualifies is kept whether or not NANOCHAT_KEEP_TORCH asked for it; one that does not
    is replaced, unless the user asked to keep it, which then fails with what is wrong."""
    problem = why_not_kept(existing, driver_cuda)
    if problem is None:
        torch_version, cuda_version = existing
        return "keep", "", (f"keeping torch {torch_version[0]}.{torch_version[1]} (CUDA {cuda_version[0]}.{cuda_version[1]}): "
                            f"FA3 loads its build {fa3_build(*existing)}")
    if keep_requested:
        return "refuse", "", f"NANOCHAT_KEEP_TORCH=1 but {problem}; unset it to install torch {PINNED_TORCH}"
    if driver_cuda is None or driver_cuda[0] >= 13:
        return "install", f"torch=={PINNED_TORCH}", (f"installing torch {PINNED_TORCH} (PyPI, CUDA 13.0; {problem}): FA3 loads "
                                                     f"its build {fa3_build(parse_version(PINNED_TORCH), (13, 0))}")
    if driver_cuda[0] == 12:
        return "install", f"torch=={PINNED_TORCH} --index-url {CUDA12_INDEX}", (
            f"installing torch {PINNED_TORCH}+cu126 (the driver runs CUDA {driver_cuda[0]}.{driver_cuda[1]}, PyPI's build needs 13; "
            f"{problem}): FA3 loads its build {fa3_build(parse_version(PINNED_TORCH), (12, 6))}")
    return "refuse", "", (f"the NVIDIA driver runs CUDA {driver_cuda[0]}.{driver_cuda[1]}; torch {PINNED_TORCH} and FA3 need CUDA "
                          ">= 12.6: update the driver")


def driver_cuda_version():
    """The newest CUDA the installed driver runs, from nvidia-smi's header ('CUDA Version: 12.8'), or None."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*(\d+\.\d+)", out)
    return parse_version(m.group(1)) if m else None


def importable_torch():
    """(torch_version, cuda_version or None) of the torch this interpreter imports, or None."""
    try:
        import torch
    except ImportError:
        return None
    return parse_version(torch.__version__), parse_version(torch.version.cuda)


def main(argv=None):
    # argparse only for --help (and a one-line refusal of anything else): the decision takes no options
    argparse.ArgumentParser(prog="python scripts/torch_choice.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    action, pip_args, reason = choose_torch(importable_torch(), driver_cuda_version(),
                                            os.environ.get("NANOCHAT_KEEP_TORCH") == "1")
    print(f"torch_choice: {reason}", file=sys.stderr)
    if action == "refuse":
        return 1
    print(pip_args or "keep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
