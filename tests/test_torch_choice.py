"""scripts/torch_choice.py: which torch a GPU node's venv gets, on fake torch/driver inputs, and the
command line on this CPU box (no nvidia-smi, a CPU torch)."""

import os
import re
import subprocess
import sys

from scripts.torch_choice import CUDA12_INDEX, PINNED_TORCH, choose_torch, fa3_build, parse_version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_version():
    assert parse_version("2.9.1+cu128") == (2, 9) and parse_version("12.8") == (12, 8) and parse_version("13.0") == (13, 0)
    assert parse_version(None) is None and parse_version("") is None


def test_fa3_build_follows_the_kernels_resolver():
    """Same CUDA major, build minor not newer than torch's, torch >= 2.9 (the stable-ABI builds)."""
    assert fa3_build((2, 13), (13, 0)) == "torch-stable-abi29-cu130-x86_64-linux"
    assert fa3_build((2, 9), (12, 8)) == "torch-stable-abi29-cu128-x86_64-linux"
    assert fa3_build((2, 10), (12, 9)) == "torch-stable-abi29-cu128-x86_64-linux"
    assert fa3_build((2, 13), (12, 6)) == "torch-stable-abi29-cu126-x86_64-linux"
    assert fa3_build((2, 11), (12, 4)) is None  # older than every CUDA 12 build
    assert fa3_build((2, 8), (12, 8)) is None  # older than the stable ABI the builds target
    assert fa3_build((2, 13), None) is None  # CPU build


def test_a_qualifying_torch_is_kept_with_or_without_asking():
    for keep in (False, True):
        action, pip_args, reason = choose_torch(((2, 9), (12, 8)), (12, 8), keep)
        assert (action, pip_args) == ("keep", "") and "torch-stable-abi29-cu128" in reason


def test_pinned_torch_in_the_cuda_the_driver_runs():
    action, pip_args, reason = choose_torch(None, (13, 0), False)
    assert (action, pip_args) == ("install", f"torch=={PINNED_TORCH}") and "torch-stable-abi29-cu130" in reason
    assert choose_torch(None, None, False)[1] == f"torch=={PINNED_TORCH}"  # driver unknown: PyPI's build
    action, pip_args, reason = choose_torch(((2, 13), None), (12, 4), False)  # a CPU torch on a CUDA 12.4 driver
    assert (action, pip_args) == ("install", f"torch=={PINNED_TORCH} --index-url {CUDA12_INDEX}")
    assert "CPU build" in reason and "torch-stable-abi29-cu126" in reason
    # a CUDA 13 torch on a CUDA 12 driver cannot start: replaced by the 12.6 build
    assert choose_torch(((2, 13), (13, 0)), (12, 8), False)[1].endswith(CUDA12_INDEX)
    assert choose_torch(((2, 8), (12, 8)), (12, 8), False)[0] == "install"


def test_refusals_say_what_is_wrong():
    action, _, reason = choose_torch(((2, 8), (12, 8)), (12, 8), True)
    assert action == "refuse" and "NANOCHAT_KEEP_TORCH=1" in reason and "older than 2.9" in reason
    action, _, reason = choose_torch(((2, 11), (12, 4)), (12, 4), True)
    assert action == "refuse" and "CUDA >= 12.6" in reason
    action, _, reason = choose_torch(None, (11, 8), False)
    assert action == "refuse" and "update the driver" in reason


def test_pinned_torch_matches_the_cpu_pin_of_setup_venv():
    with open(os.path.join(REPO, "scripts", "setup_venv.sh")) as f:
        assert re.search(r'"torch==([\d.]+)\+cpu"', f.read()).group(1) == PINNED_TORCH


def test_command_line_on_a_cpu_box():
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_KEEP_TORCH"}
    env["PATH"] = os.path.dirname(sys.executable)  # no nvidia-smi: driver unknown
    out = subprocess.run([sys.executable, "scripts/torch_choice.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"torch=={PINNED_TORCH}" and "CPU build" in out.stderr
    env["NANOCHAT_KEEP_TORCH"] = "1"
    out = subprocess.run([sys.executable, "scripts/torch_choice.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == "" and len(out.stderr.strip().splitlines()) == 1


def test_help_is_help_and_decides_nothing():
    """`--help` used to be ignored: it printed an install decision, which setup_venv.sh would act on."""
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_KEEP_TORCH"}
    for cmd in (["scripts/torch_choice.py", "--help"], ["-m", "scripts.torch_choice", "--help"]):
        out = subprocess.run([sys.executable] + cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("usage:") and "NANOCHAT_KEEP_TORCH" in out.stdout, out
        assert "torch==" not in out.stdout and "torch_choice:" not in out.stderr, out
    out = subprocess.run([sys.executable, "scripts/torch_choice.py", "--cuda", "12.8"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and "unrecognized arguments: --cuda 12.8" in out.stderr
