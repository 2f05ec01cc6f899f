"""Process-wide basics: the compute dtype, device and process-group setup, printing, paths, peak FLOPs,
and the CUDA allocator's configuration (set at import, before CUDA starts).

Everything here is model- and data-agnostic. `COMPUTE_DTYPE` is decided once at import:
bf16 on CUDA GPUs of compute capability >= 8.0, fp32 everywhere else, and the
`NANOCHAT_DTYPE` environment variable overrides it (float32 | bfloat16 | float16).
There is no autocast anywhere in nanochat: master weights stay fp32 and each `Linear`
casts its weight to the activation dtype, so this one constant decides the precision.
"""

import os
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The CUDA caching allocator reads its configuration once, when CUDA is first initialised; this
# module is imported by every entry point before anything touches CUDA (the dtype check below is
# the first to), so this is the one place that sees every run, torchrun'd or not.
ALLOC_CONF_DEFAULT = "expandable_segments:True"


def set_default_alloc_conf(environ=os.environ):
    """Sets PYTORCH_ALLOC_CONF=expandable_segments:True unless the user configured the allocator.

    Expandable segments grow one mapping instead of caching fixed-size blocks, which avoids the
    fragmentation OOMs of a large device batch whose activation sizes vary (eval vs train graphs).
    A no-op without CUDA. PYTORCH_CUDA_ALLOC_CONF is the pre-2.9 name of the same setting."""
    if "PYTORCH_ALLOC_CONF" in environ or "PYTORCH_CUDA_ALLOC_CONF" in environ:
        return
    environ["PYTORCH_ALLOC_CONF"] = ALLOC_CONF_DEFAULT


set_default_alloc_conf()


def cpu_has_native_bf16():
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles).

    Without them torch emulates bf16 matmuls: 0.4 vs 21.7 GFLOP/s fp32 on a Zen 1 EPYC core
    (dev/LOG.md), so bf16 there is a ~50x slowdown, not a speedup. With them bf16 ran 2.26x faster
    than fp32 on the AVX-512 EPYC (the CPU preset's measurement)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, present since torch 2.3
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def _resolve_compute_dtype():
    """Returns (dtype, reason). Raises ValueError with the allowed values on a bad override."""
    override = os.environ.get("NANOCHAT_DTYPE")
    if override is not None:
        if override not in _DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={override!r} is not one of {', '.join(_DTYPES)}; "
                             "unset it to auto-detect (bf16 on CUDA SM>=80, else fp32)")
        if override == "float16" and not torch.cuda.is_available():
            # measured on the 2-core dev box: fp16 matmul ~100x slower than fp32 on CPU
            raise ValueError("NANOCHAT_DTYPE=float16 is refused without CUDA: fp16 matmul on CPU is "
                             "~100x slower than fp32; use float32 or bfloat16")
        if override == "bfloat16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
            return _DTYPES[override], ("NANOCHAT_DTYPE=bfloat16, but this CPU has no native bf16 (no AVX512-BF16 "
                                       "or AMX): matmuls run ~50x slower than float32, use NANOCHAT_DTYPE=float32")
        return _DTYPES[override], f"NANOCHAT_DTYPE={override}"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return torch.bfloat16, f"auto: CUDA SM {major}{minor} supports bf16"
        return torch.float32, f"auto: CUDA SM {major}{minor} < 80 has no fast bf16"
    return torch.float32, "auto: no CUDA device (set NANOCHAT_DTYPE=bfloat16 to use a CPU's native bf16)"


try:
    COMPUTE_DTYPE, COMPUTE_DTYPE_REASON = _resolve_compute_dtype()
except ValueError as e:  # one line, not a traceback: this is a user's typo
    raise SystemExit(f"nanochat: {e}") from None


# -----------------------------------------------------------------------------
# printing and paths

def is_master():
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


def get_base_dir():
    """Where caches, tokenizers, data and checkpoints live. NANOCHAT_BASE_DIR overrides."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


# -----------------------------------------------------------------------------
# device and process group

@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_distributed(self):
        return self.world_size > 1

    @property
    def is_master(self):
        return self.rank == 0


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def init_dist(device_type=None):
    """Sets up the device and, under torchrun, the process group (nccl on CUDA, gloo otherwise).

    Without torchrun this is world size 1 and no process group: the same code path, one rank.
    """
    device_type = device_type or autodetect_device_type()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # only affects fp32 runs (NANOCHAT_DTYPE=float32)
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        dist.barrier()
    return DistInfo(rank, local_rank, world_size, device)


def cleanup_dist():
    if dist.is_initialized():
        dist.destroy_process_group()


def across_ranks(value, op, device=None):
    """value (a number) reduced over all ranks with op (dist.ReduceOp.MAX/MIN/SUM); itself on one rank.
    device defaults to what the backend needs (the current GPU for nccl, the CPU for gloo)."""
    if not dist.is_initialized():
        return value
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def rel_err(got, want):
    """||got - want|| / ||want|| in fp32: numerics of a kernel (fp8, attention) against a reference."""
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# peak FLOPs, the denominator of MFU

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets.
# Ordered: the first substring found in torch.cuda.get_device_name() wins, so the
# more specific names come before the generic ones.
GPU_PEAK_FLOPS = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),       # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def gpu_peak_flops(device_name):
    """Peak dense bf16 FLOP/s for a CUDA device name, or None if the name is not in the table."""
    for key, flops in GPU_PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


@lru_cache(maxsize=None)
def measure_cpu_matmul_flops(dtype=torch.float32, n=1024, seconds=0.5):
    """The CPU's achievable matmul FLOP/s in `dtype`: the physical limit MFU is measured against on CPU.

    Best of repeated n x n matmuls over about `seconds`, on the threads torch uses.
    """
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool and kernel selection
    best_s = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best_s = min(best_s, time.perf_counter() - t0)
    return 2 * n ** 3 / best_s


def peak_flops(device, dtype=None):
    """Peak FLOP/s of one device for MFU: the GPU table on CUDA, a measured matmul peak on CPU.

    Returns (flops, source). On an unknown GPU flops is None and MFU is not reported.
    """
    dtype = dtype or COMPUTE_DTYPE
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak_flops(name), f"table: {name} dense bf16"
    return measure_cpu_matmul_flops(dtype), f"measured: CPU {str(dtype).removeprefix('torch.')} matmul"
