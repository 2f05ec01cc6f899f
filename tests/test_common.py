"""common.py: the NANOCHAT_DTYPE override (in fresh processes), peak FLOPs, single-process dist info."""

import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import gpu_peak_flops, init_dist, measure_cpu_matmul_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FWD_BWD = """
import torch
from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import GPT, GPTConfig
cfg = GPTConfig.from_depth(2, vocab_size=256, sequence_len=32, head_dim=32)
with torch.device("meta"):
    model = GPT(cfg)
model.to_empty(device="cpu"); model.init_weights()
idx = torch.randint(0, 256, (2, 32))
loss = model(idx, idx)
loss.backward()
assert model.lm_head.weight.grad.dtype == torch.float32  # master weights stay fp32
print(COMPUTE_DTYPE, model.hidden_states(idx).dtype, round(loss.item(), 2))
"""


def run_python(code, dtype):
    env = {**os.environ, "NANOCHAT_DTYPE": dtype} if dtype else {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dtype,expected", [(None, "torch.float32"), ("float32", "torch.float32"), ("bfloat16", "torch.bfloat16")])
def test_dtype_override_runs_forward_backward(dtype, expected):
    result = run_python(FWD_BWD, dtype)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == [expected, expected]


@pytest.mark.parametrize("value,message", [("banana", "not one of float32, bfloat16, float16"), ("float16", "refused without CUDA")])
def test_bad_dtype_is_a_one_line_error(value, message):
    result = run_python("import nanochat.common", value)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_gpu_peak_table_prefers_specific_names():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Mystery GPU") is None


def test_cpu_peak_is_measured():
    flops = measure_cpu_matmul_flops(torch.float32, n=256, seconds=0.05)
    assert 1e8 < flops < 1e14


def test_single_process_dist_info(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    info = init_dist("cpu")
    assert (info.rank, info.world_size, info.is_distributed, info.device.type) == (0, 1, False, "cpu")


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_has_native_bf16_reads_the_cpu_features(monkeypatch, avx512_bf16, amx, expected):
    from nanochat.common import cpu_has_native_bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_has_native_bf16() is expected


def test_cpu_has_native_bf16_is_false_on_a_torch_without_the_checks(monkeypatch):
    from nanochat.common import cpu_has_native_bf16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert cpu_has_native_bf16() is False


def test_emulated_bf16_on_cpu_says_so_in_the_dtype_reason():
    # fresh process, features forced off: the reason printed by base_train/preflight names the slowdown
    code = ("import torch; torch.cpu._is_avx512_bf16_supported = lambda: False; torch.cpu._is_amx_tile_supported = lambda: False\n"
            "from nanochat.common import COMPUTE_DTYPE, COMPUTE_DTYPE_REASON; print(COMPUTE_DTYPE, '|', COMPUTE_DTYPE_REASON)")
    result = run_python(code, "bfloat16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("torch.bfloat16 |") and "no native bf16" in result.stdout and "float32" in result.stdout
