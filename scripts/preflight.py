"""Preflight: check a node before a paid speedrun, in one command, with the library's own code.

    torchrun --standalone --nproc_per_node=8 -m scripts.preflight -- --depth 24 --fp8 --run d24
    python -m scripts.preflight --depth 4 --max-seq-len 256        (one process, any machine)

(The `--` keeps torchrun's own parser off the flags: it would take --run for its --run-path.)
Every flag but preflight's own (--gpu-hour-usd, --burst-steps, --burst-warmup-steps,
--skip-burst) is base_train's, parsed by base_train's parser, and the run is resolved by
base_train.resolve_hyperparameters: the horizon, batch and accumulation checked are exactly
those training will use. Rank 0 prints one row per check (PASS / WARN /
FAIL / SKIP) whose message says what to fix. Ranks gather their rows and each check shows its
worst status over ranks, so every rank exits with the same code: 1 on any FAIL, else 0.

Checks (small functions returning Rows, so tests call them with injected faults):
- hardware:   GPU model, SM, memory, driver; torch/CUDA/NCCL; COMPUTE_DTYPE and why; MFU peak
- tokenizer and run plan: the tokenizer loads and round-trips text; base_train's resolved run
  (--device-batch-size auto resolved as base_train resolves it: the "batch auto" row)
- memory plan: one rank's training step traced on fake tensors (nanochat/memory_plan.py) against the
              device's memory with the plan's margin (system RAM on CPU, where not fitting only WARNs)
- attention:  FlashAttention present (on a GPU without it: what SDPA's dense window masks cost,
              FAIL on several GPUs unless --window-pattern L); for every window of the pattern, forward and
              backward of the backend training will use against a reference (FA3 vs SDPA on
              Hopper, SDPA vs naive_attention elsewhere)
- fp8:        (--fp8) device support and Float8Linear vs bf16 Linear numerics on the device
- collectives: all_reduce, reduce_scatter, all_gather give the right values; bus bandwidth
- throughput: a burst of real training steps (the run's model, MuonAdamW, synthetic tokens):
              tok/s and MFU; the projected time and cost of the whole run
- data:       the shards the run needs present and readable (each source of a --data mixture); the loader keeps up
- disk:       free space for the planned checkpoints; the run directory writable
- wandb:      mode and credentials when --run is set
Without CUDA the GPU-only rows are SKIP and the burst uses a small stand-in model (depth <= 4,
T <= 256, B <= 8; its row says so): the projection then assumes the stand-in's FLOP/s.
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple

import torch
import torch.distributed as dist

from nanochat import attention as attn
from nanochat import memory_plan
from nanochat.checkpoint import list_steps
from nanochat.cli import ArgumentParser, number
from nanochat.common import (COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, across_ranks, cleanup_dist, get_base_dir, init_dist,
                             peak_flops, print0, rel_err, synchronize)
from nanochat.dataloader import DataLoader
from nanochat.dataset import (LAST_SHARD_INDEX, DataError, check_hub_reachable, list_parquet_files, list_row_groups,
                              read_row_group, shard_filename, split_files)
from nanochat.fp8 import FP8_REL_TOL, Float8Linear, convert_to_fp8, fp8_supported, relative_errors_vs_bf16
from nanochat.gpt import GPT, GPTConfig, Linear
from nanochat.loss_scale import DynamicLossScaler
from nanochat.mixture import check_sources, resolve_sources, shares
from nanochat.optim import all_gather_single, reduce_scatter_single
from nanochat.report import MFU_HEALTHY, diagnose_low_mfu, model_flops_utilization
from nanochat.tokenizer import get_tokenizer
from scripts import base_train

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
SEVERITY = {SKIP: 0, PASS: 1, WARN: 2, FAIL: 3}
Row = namedtuple("Row", "check status message")

# relative L2 error of attention output and q/k/v gradients against the reference. Measured on CPU
# at T=2048, head dim 128 (dev/LOG.md): SDPA vs naive 6e-7 in fp32, 2-5e-3 in bf16 (8-bit mantissa,
# two accumulation orders); a wrong window or mask is off by 10-100%.
ATTN_REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
ATTN_CHECK_HEADS = 4  # heads are independent: a few of them exercise the kernel as well as all
# Float8Linear vs bf16 Linear, relative error: measured 0.037 (out), 0.059 (grads), dev/LOG.md FP8 entry
FP8_CHECK_SHAPE = {"cuda": (2048, None), "cpu": (256, 256)}  # (rows, max in_features); None: the model's width
COMM_BYTES = {"cuda": 2**30, "cpu": 2**22}  # nccl-tests busbw is near its plateau at 1 GiB on NVLink
COMM_ITERS = {"cuda": (5, 20), "cpu": (1, 5)}  # (untimed, timed)
# nccl-tests busbw at large messages within one node, GB/s: 8xH100/H200 SXM (NVLink4, 450 GB/s per
# direction) measure 460-480 for all_reduce, 8xA100 SXM 230-250, 8xH100 PCIe without NVSwitch 35-45.
# More specific names first; None: no single reference figure (NVLink bridges pair GPUs).
EXPECTED_BUSBW = [("H100 PCIe", 40e9), ("H100 NVL", None), ("H200", 450e9), ("H100", 450e9), ("A100", 230e9)]
BUSBW_WARN_FRACTION = 0.5
GPU_FREE_MEMORY_MIN_FRACTION = 0.9  # below this another process holds the GPU (our CUDA context is ~0.5 GiB)
CPU_BURST_LIMITS = {"depth": 4, "max_seq_len": 256, "device_batch_size": 8}
CROP_LOSS = 0.35  # NOTES "Data": best-fit packing at T=2048 discards 34.6% of the document tokens it consumes
LOADER_MIN_SECONDS = 1.0
DEFAULT_VOCAB = GPTConfig.vocab_size  # only to size the plan when the tokenizer is missing (its row FAILs)
SAMPLE_TEXT = "Preflight: the quick brown fox paid $24.50 for 8 GPUs at 12:34, déjà vu.\n"


def parse_args(argv=None):
    """(preflight's own flags, base_train's Namespace of the run to check)."""
    p = ArgumentParser(description="Check a node before a speedrun: PASS/WARN/FAIL/SKIP per check, exit 1 on FAIL.",
                       epilog="Every other flag is base_train's (python -m scripts.base_train --help) and shapes "
                              "the run being checked, e.g. --depth 24 --fp8 --device-batch-size 32.")
    p.add_argument("--gpu-hour-usd", type=number(float, low=0.0), default=3.0, help="price of one GPU-hour for the cost projection (8xH100 at ~$24/h)")
    p.add_argument("--burst-steps", type=number(int, low=1), default=10, help="timed optimizer steps of the throughput burst")
    p.add_argument("--burst-warmup-steps", type=number(int, low=0), default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--skip-burst", action="store_true", help="leave out the throughput burst (and the rows that need it)")
    own, rest = p.parse_known_args(argv)
    return own, base_train.parse_args(rest)


# -----------------------------------------------------------------------------
# helpers

def max_rel_err(got, want):
    """max |got - want| / max |want|: a collective must get every element right, one bad value shows."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def guarded(names, check, *args):
    """check(*args), or on an exception a FAIL row for the first name (and SKIP for the others)."""
    try:
        return check(*args)
    except Exception as e:  # a check that crashes is itself a finding, and the other checks still run
        return [Row(names[0], FAIL, f"crashed with {type(e).__name__}: {e}")] + [Row(n, SKIP, "not run") for n in names[1:]]


def gib(n_bytes):
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def count(n):
    """1234567 -> '1.23M': token and parameter counts in a row."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def duration(seconds):
    hours = seconds / 3600
    return f"{seconds / 60:.1f} min" if hours < 1 else f"{hours:.2f} h" if hours < 100 else f"{hours:,.0f} h"


# -----------------------------------------------------------------------------
# hardware and software

def nvidia_driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def check_gpu(device):
    if device.type != "cuda":
        return [Row("gpu", SKIP, f"no CUDA device (running on {device.type}): GPU model, SM, memory and driver not checked")]
    props = torch.cuda.get_device_properties(device)
    free_b, total_b = torch.cuda.mem_get_info(device)
    desc = (f"{props.name}, SM {props.major}{props.minor}, {gib(total_b)} ({gib(free_b)} free), "
            f"{torch.cuda.device_count()} visible, driver {nvidia_driver_version()}")
    if free_b < GPU_FREE_MEMORY_MIN_FRACTION * total_b:
        return [Row("gpu", WARN, f"{desc}: another process holds {gib(total_b - free_b)} of {device}; find it with "
                                 "nvidia-smi and stop it")]
    if props.major < 8:
        return [Row("gpu", WARN, f"{desc}: no bf16 below SM 80, the run would be fp32 and several times slower; rent Ampere or "
                                 "newer (Hopper for FA3 and FP8)")]
    return [Row("gpu", PASS, desc)]


def check_software(device):
    parts = [f"torch {torch.__version__}", f"python {sys.version.split()[0]}"]
    if device.type == "cuda":
        nccl = torch.cuda.nccl.version()  # a tuple in torch 2.x, an int in older builds
        parts += [f"CUDA {torch.version.cuda}", "NCCL " + (".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))]
    return [Row("software", PASS, ", ".join(parts))]


def check_compute_dtype(device):
    name = str(COMPUTE_DTYPE).removeprefix("torch.")
    if device.type == "cuda" and COMPUTE_DTYPE != torch.bfloat16:
        fix = "unset NANOCHAT_DTYPE" if "NANOCHAT_DTYPE" in COMPUTE_DTYPE_REASON else "use a GPU of SM >= 80"
        return [Row("compute dtype", WARN, f"{name} ({COMPUTE_DTYPE_REASON}): the speedrun is tuned and timed in bf16; {fix}")]
    return [Row("compute dtype", PASS, f"{name}: {COMPUTE_DTYPE_REASON}")]


def check_peak_flops(peak, source):
    if not peak:
        return [Row("peak flops", WARN, f"{source} is not in nanochat.common.GPU_PEAK_FLOPS, so MFU is not reported: add the GPU's "
                                        "dense bf16 peak there")]
    return [Row("peak flops", PASS, f"{peak / 1e12:.3g} TFLOP/s per device ({source}): the MFU denominator")]


# -----------------------------------------------------------------------------
# tokenizer and the run plan

def check_tokenizer(tokenizer_dir):
    """(rows, tokenizer or None)."""
    directory = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    try:
        tokenizer = get_tokenizer(directory)
    except (OSError, ValueError, KeyError) as e:
        return [Row("tokenizer", FAIL, str(e))], None
    ids = tokenizer.encode(SAMPLE_TEXT, prepend_bos=True)
    if ids[0] != tokenizer.bos_token_id or tokenizer.decode(ids[1:]) != SAMPLE_TEXT:
        return [Row("tokenizer", FAIL, f"{directory}: encode/decode does not round-trip text; retrain it with "
                                       "`python -m scripts.tok_train`")], None
    return [Row("tokenizer", PASS, f"{directory}: vocab {tokenizer.vocab_size:,}, round-trips text")], tokenizer


def check_run_plan(args, vocab_size, world_size):
    """(rows, (meta-device model, hp) or None): the run as base_train resolves it; no memory is allocated."""
    try:
        with torch.device("meta"):
            model = GPT(base_train.build_config(args, vocab_size))
        hp = base_train.resolve_hyperparameters(args, model, world_size)
    except (ValueError, SystemExit) as e:  # resolve_hyperparameters exits with the fix on an indivisible batch
        return [Row("run plan", FAIL, str(e))], None
    return [Row("run plan", PASS,
                f"d{hp['depth']} (width {hp['width']}, {count(hp['params_scaling'])} scaling params), {hp['num_iterations']:,} steps "
                f"x {hp['total_batch_tokens']:,} tokens = {count(hp['training_tokens'])} tokens ({hp['tokens_per_param']:.1f} per "
                f"param), {hp['grad_accum_steps']} micro-steps of {args.device_batch_size}x{args.max_seq_len} per rank")], (model, hp)


def resolve_auto_batch(args, vocab_size, world_size, device):
    """--device-batch-size auto: the batch base_train would pick (every rank traces the same plan); its row."""
    with torch.device("meta"):
        model = GPT(base_train.build_config(args, vocab_size))
    try:
        args.device_batch_size, lines = memory_plan.plan_device_batch(
            model, 0, base_train.resolved_total_batch(args, model), world_size, args.fp8, memory_plan.target_compute_dtype(),
            device)
    except SystemExit as e:  # not even batch 1 fits: the message says what to change
        return [Row("batch auto", FAIL, str(e))]
    return [Row("batch auto", PASS, lines[-1])]


def check_memory_plan(model, args, world_size, device, master):
    """One rank's training step traced on fake tensors (nanochat/memory_plan.py) against the device's memory.

    On CPU the device memory is the system RAM. Rank 0 traces (every rank runs the same step)."""
    if not master:
        return [Row("memory plan", SKIP, "rank 0 plans for every rank")]
    device_bytes, what = memory_plan.device_memory_bytes(device)
    total = base_train.resolved_total_batch(args, model)
    accum = max(1, total // (args.device_batch_size * args.max_seq_len * world_size))
    plan = memory_plan.plan_training_step(model.config, args.device_batch_size, world_size, args.fp8,
                                          memory_plan.target_compute_dtype(), accum)
    message = f"{plan.summary()}; {what}: {gib(device_bytes)}"
    if plan.fits(device_bytes):
        return [Row("memory plan", PASS, message)]
    fix = "lower --device-batch-size (the total batch stays, with more accumulation) or pass --device-batch-size auto"
    return [Row("memory plan", FAIL if device.type == "cuda" else WARN, f"{message}: does not fit; {fix}")]


# -----------------------------------------------------------------------------
# attention

def check_flash_attention(device, dtype, model, world_size):
    """FA3 present; without it on a GPU, what SDPA's dense window masks cost. Paying that on several GPUs
    is a FAIL: the windows buy nothing under SDPA, and --window-pattern L (or FA3) is the fix."""
    backend, reason = attn.select_backend(device, dtype)
    if device.type != "cuda":
        return [Row("flash attention", SKIP, f"{reason}; the SDPA path is checked against naive_attention below")]
    if backend == "fa3":
        return [Row("flash attention", PASS, reason)]
    fix = (f"on Hopper get FA3 ({attn.FA3_HUB_REPO} v{attn.FA3_HUB_VERSION} via kernels: torch >= 2.9 on CUDA >= 12.6, as "
           "scripts/setup_venv.sh installs)")
    notice = attn.sdpa_window_notice(device, dtype, model.config, model.estimate_flops())
    if notice is None:  # no sliding windows: only the kernel itself is slower (FA3 is reported 1.5-2x FA2 on H100)
        return [Row("flash attention", WARN, f"{reason}. No sliding windows, but SDPA is a slower kernel than FA3: {fix}")]
    if world_size > 1:
        return [Row("flash attention", FAIL, f"{reason}. {notice}: {fix}, or pass --window-pattern L")]
    return [Row("flash attention", WARN, f"{reason}. {notice}: {fix}, or pass --window-pattern L for a long run")]


def forward_backward(fn, q, k, v, window, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, window)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def check_attention_windows(device, dtype, config):
    """One row per window of the pattern: attention() as training calls it vs a reference, forward and backward."""
    backend, _ = attn.select_backend(device, dtype)
    if backend == "fa3":
        used, ref_name, reference = "FA3", "SDPA", attn.sdpa_attention
        fix = ("the FlashAttention build is wrong for this window: reinstall flash-attn built for this torch/CUDA "
               "(pip install 'nanochat[gpu]'), or uninstall it so training falls back to SDPA")
    else:
        used, ref_name, reference = "SDPA", "naive_attention", attn.naive_attention
        fix = ("PyTorch SDPA is wrong for this window on this device: reinstall torch, or rerun with "
               "NANOCHAT_DTYPE=float32 to narrow it down")
    T, H = config.sequence_len, min(config.n_head, ATTN_CHECK_HEADS)
    H_kv = max(1, H * config.n_kv_head // config.n_head)
    tol = ATTN_REL_TOL[dtype]
    rows = []
    for window in sorted(set(config.window_sizes())):
        torch.manual_seed(window)
        q = torch.randn(1, T, H, config.head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(1, T, H_kv, config.head_dim, device=device, dtype=dtype) for _ in range(2))
        grad_out = torch.randn_like(q)
        got = forward_backward(attn.attention, q, k, v, window, grad_out)
        want = forward_backward(reference, q, k, v, window, grad_out)
        errors = dict(zip(("out", "dq", "dk", "dv"), (rel_err(g, w) for g, w in zip(got, want))))
        worst = max(errors, key=lambda name: errors[name] if math.isfinite(errors[name]) else math.inf)
        detail = (f"{used} vs {ref_name} (T={T}, {H} heads, {str(dtype).removeprefix('torch.')}): worst rel err "
                  f"{errors[worst]:.1e} ({worst}), tolerance {tol:.0e}")
        ok = all(e <= tol for e in errors.values())  # NaN fails too
        rows.append(Row(f"attention w={window}", PASS if ok else FAIL, detail if ok else f"{detail}: {fix}"))
    return rows


# -----------------------------------------------------------------------------
# fp8

def check_fp8(device, enabled, width):
    if not enabled:
        return [Row("fp8", SKIP, "--fp8 not set")]
    ok, why = fp8_supported(device)
    if not ok:
        return [Row("fp8", FAIL, why)]
    rows_n, max_in = FP8_CHECK_SHAPE[device.type]
    K = min(width, max_in or width)
    N = 4 * K  # the MLP's c_fc shape
    torch.manual_seed(0)
    linear = Linear(K, N).to(device)
    with torch.no_grad():
        linear.weight.uniform_(-(3 / K) ** 0.5, (3 / K) ** 0.5)  # the GPT's init
    x = torch.randn(rows_n, K, device=device, dtype=torch.bfloat16)
    grad_out = torch.randn(rows_n, N, device=device, dtype=torch.bfloat16)
    errors = relative_errors_vs_bf16(linear, x, grad_out)
    detail = f"Float8Linear vs bf16 Linear ({K}->{N}, {rows_n} rows): " + ", ".join(
        f"{name} {err:.3f} (tol {FP8_REL_TOL[name]})" for name, err in errors.items())
    if not all(errors[name] <= tol for name, tol in FP8_REL_TOL.items()):
        return [Row("fp8", FAIL, f"{detail}: fp8 matmuls are wrong on this device/torch build; train without --fp8 or change torch")]
    return [Row("fp8", PASS, f"{why}; {detail}")]


# -----------------------------------------------------------------------------
# collectives

def expected_busbw(device):
    """(bytes/s or None, why) the interconnect should reach in nccl-tests."""
    if device.type != "cuda":
        return None, "gloo on CPU: figure for information"
    if dist.get_world_size() > int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())):
        return None, "multi-node: bounded by the inter-node network, compare with its nccl-tests figure"
    name = torch.cuda.get_device_name(device)
    for key, busbw in EXPECTED_BUSBW:
        if key in name:
            return busbw, "" if busbw else f"no reference figure for {name}"
    return None, f"no reference figure for {name}"


def time_collective(fn, device):
    """Seconds per call of fn, the slowest rank's (nccl-tests reports the same)."""
    warmup, iters = COMM_ITERS[device.type]
    for _ in range(warmup):
        fn()
    synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return across_ranks(time.perf_counter() - t0, dist.ReduceOp.MAX, device) / iters


def bandwidth_row(name, max_error, seconds, size_bytes, bus_factor, device):
    """nccl-tests arithmetic: algbw = S / t, busbw = algbw * bus_factor (S: the full buffer)."""
    algbw = size_bytes / seconds
    busbw = algbw * bus_factor
    figures = f"{size_bytes / 2**20:.0f} MiB in {seconds * 1e3:.2f} ms: algbw {algbw / 1e9:.2f} GB/s, busbw {busbw / 1e9:.2f} GB/s"
    if not max_error <= 1e-5:
        return Row(name, FAIL, f"wrong values (max rel error {max_error:.1e}): the interconnect or NCCL install is broken; check "
                               "`nvidia-smi topo -m`, NCCL_* environment variables, and rerun with NCCL_DEBUG=INFO")
    expected, why = expected_busbw(device)
    if expected is None:
        return Row(name, PASS, f"{figures} ({why})")
    if busbw < BUSBW_WARN_FRACTION * expected:
        return Row(name, WARN, f"{figures}, under {BUSBW_WARN_FRACTION:.0%} of the ~{expected / 1e9:.0f} GB/s this node should "
                               "reach: check `nvidia-smi topo -m` (NV# between every GPU pair), `nvidia-smi nvlink -s`, and that "
                               "NCCL_P2P_DISABLE / NCCL_SHM_DISABLE are unset")
    return Row(name, PASS, f"{figures} (expected ~{expected / 1e9:.0f} GB/s)")


def check_collectives(device):
    """all_reduce, reduce_scatter, all_gather as MuonAdamW calls them (AVG), checked for values and timed.

    Bus bandwidth per nccl-tests (PERFORMANCE.md), n ranks, S the full buffer in bytes, t seconds:
    all_reduce busbw = S/t * 2(n-1)/n; reduce_scatter (S = input) and all_gather (S = output)
    busbw = S/t * (n-1)/n: the bytes each rank's link really carries, comparable with link speed.
    """
    names = ("all_reduce", "reduce_scatter", "all_gather")
    if not dist.is_initialized():
        return [Row(n, SKIP, "one rank: nothing to communicate (launch with torchrun --nproc_per_node=N)") for n in names]
    n, rank, avg = dist.get_world_size(), dist.get_rank(), dist.ReduceOp.AVG
    chunk = COMM_BYTES[device.type] // 4 // n
    numel = chunk * n
    pattern = (torch.arange(numel, device=device) % 1024).float()
    mean_factor = (n + 1) / 2  # rank r sends (r + 1) * pattern: the average over ranks
    rows = []

    x = pattern * (rank + 1)
    dist.all_reduce(x, op=avg)
    error = max_rel_err(x, pattern * mean_factor)
    rows.append(bandwidth_row("all_reduce", error, time_collective(lambda: dist.all_reduce(x, op=avg), device),
                              numel * 4, 2 * (n - 1) / n, device))

    full, out = pattern * (rank + 1), torch.empty(chunk, device=device)
    reduce_scatter_single(out, full, op=avg)
    error = max_rel_err(out, pattern[rank * chunk:(rank + 1) * chunk] * mean_factor)
    rows.append(bandwidth_row("reduce_scatter", error, time_collective(lambda: reduce_scatter_single(out, full, op=avg), device),
                              numel * 4, (n - 1) / n, device))

    mine, gathered = pattern[:chunk] + rank, torch.empty(numel, device=device)
    all_gather_single(gathered, mine)
    error = max_rel_err(gathered.view(n, chunk), pattern[:chunk] + torch.arange(n, device=device)[:, None])
    rows.append(bandwidth_row("all_gather", error, time_collective(lambda: all_gather_single(gathered, mine), device),
                              numel * 4, (n - 1) / n, device))
    return rows


# -----------------------------------------------------------------------------
# throughput: a burst of real training steps

def burst_args(args, device):
    """(args, note): the run's flags on CUDA; on CPU a small stand-in of the same shape rules."""
    if device.type == "cuda":
        return args, ""
    small = {k: min(getattr(args, k), cap) for k, cap in CPU_BURST_LIMITS.items()}
    note = ("" if all(small[k] == getattr(args, k) for k in small) else
            f" [CPU stand-in: d{small['depth']}, T={small['max_seq_len']}, B={small['device_batch_size']}]")
    return argparse.Namespace(**{**vars(args), **small}), note


def build_for_burst(args, hp, vocab_size, device):
    """(model, optimizer, the model as called in training): built the way base_train builds them."""
    model = base_train.build_model(args, vocab_size, device)
    optimizer = base_train.build_optimizer(model, hp, args)
    if args.fp8 and fp8_supported(device)[0]:  # unsupported: the fp8 row FAILs, the burst measures bf16
        convert_to_fp8(model)
    return model, optimizer, torch.compile(model, dynamic=False) if args.compile else model


def synthetic_batch(vocab_size, B, T, device):
    """Fresh random tokens for every micro-step: a repeated batch gets memorised, and its vanishing
    gradients crawl through denormal arithmetic on CPU (measured: 0.5 s -> 2.5 s per d2 step)."""
    tokens = torch.randint(vocab_size, (B, T + 1), device=device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def synthetic_batches(vocab_size, B, T, device):
    while True:
        yield synthetic_batch(vocab_size, B, T, device)


def run_burst(args, hp, vocab_size, device, peak, steps, warmup_steps):
    """(rows, rates or None): timed training steps of the run's model and MuonAdamW on synthetic tokens.

    rates: {"flops_per_s": model FLOP/s of all ranks, "tok_per_s_per_rank": tokens one rank consumes per second}.
    Every rank first runs one forward/backward and all agree it worked before any optimizer
    step: a rank that fails there (OOM, compile error) would otherwise hang the others in the
    optimizer's collectives.
    """
    b_args, note = burst_args(args, device)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    grad_accum = hp["grad_accum_steps"] if device.type == "cuda" else 1  # a CPU stand-in takes one micro-step per step
    B, T = b_args.device_batch_size, b_args.max_seq_len
    batches = synthetic_batches(vocab_size, B, T, device)
    scaler = DynamicLossScaler(enabled=COMPUTE_DTYPE == torch.float16)
    error = None
    try:
        model, optimizer, compiled = build_for_burst(b_args, hp, vocab_size, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        compiled(*next(batches)).backward()  # compiles the training graph
        model.zero_grad(set_to_none=True)
    except Exception as e:
        error = e
    if not across_ranks(error is None, dist.ReduceOp.MIN, device):
        if error is None:
            return [Row("throughput", SKIP, "another rank failed its first training step (see its row)")], None
        if isinstance(error, torch.OutOfMemoryError):
            return [Row("throughput", FAIL, f"out of memory at --device-batch-size {B} x {T}: lower --device-batch-size (the "
                                            "total batch stays the same, with more accumulation steps)")], None
        return [Row("throughput", FAIL, f"the first training step failed: {type(error).__name__}: {error}")], None

    try:
        for _ in range(warmup_steps):
            base_train.train_step(model, compiled, optimizer, scaler, batches, grad_accum)
        synchronize(device)
        t0, optim_s = time.perf_counter(), 0.0
        for _ in range(steps):
            loss, _, dt_optim, _, _ = base_train.train_step(model, compiled, optimizer, scaler, batches, grad_accum)
            optim_s += dt_optim
        loss = loss.item()
    except Exception as e:  # past the agreement: every rank most likely fails alike (or the others hang in a collective)
        return [Row("throughput", FAIL, f"a training step failed: {type(e).__name__}: {e}")], None
    elapsed = across_ranks(time.perf_counter() - t0, dist.ReduceOp.MAX, device)
    if not math.isfinite(loss):
        return [Row("throughput", FAIL, f"training loss is {loss} after {warmup_steps + steps} steps: numerics are broken here; "
                                        "retry with NANOCHAT_DTYPE=float32 (and without --fp8) to narrow it down")], None
    tok_per_s = grad_accum * B * T * world_size * steps / elapsed
    flops_per_token = model.estimate_flops()
    mfu = model_flops_utilization(flops_per_token, tok_per_s, peak, world_size)
    message = (f"{tok_per_s:,.0f} tok/s on {world_size} x {device.type}, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}, "
               f"{elapsed / steps * 1e3:.0f} ms/step ({grad_accum} x {B}x{T} per rank, {'compiled' if args.compile else 'eager'}"
               f"{', fp8' if any(isinstance(m, Float8Linear) for m in model.modules()) else ''}), optimizer {optim_s / elapsed:.0%} of step, loss {loss:.2f}")
    if device.type == "cuda":
        total_memory = torch.cuda.get_device_properties(device).total_memory
        message += f", peak memory {gib(torch.cuda.max_memory_allocated(device))} of {gib(total_memory)}"
    problems = throughput_problems(mfu, optim_s / elapsed, B * T, args.compile) if device.type == "cuda" else []
    rates = {"flops_per_s": flops_per_token * tok_per_s, "tok_per_s_per_rank": tok_per_s / world_size}
    return [Row("throughput", WARN if problems else PASS, "; ".join([message, *problems]) + note)], rates


def throughput_problems(mfu, optim_frac, tokens_per_micro_step, compiled):
    """What to fix on a GPU burst (on CPU the 40% MFU bar means nothing)."""
    problems = []
    if mfu is None:
        problems.append("MFU unknown (see peak flops)")
    elif mfu < MFU_HEALTHY:
        problems.append(diagnose_low_mfu(mfu, 0.0, optim_frac, tokens_per_micro_step))  # synthetic data: no data wait
    if not compiled:
        problems.append("the burst ran eager, the speedrun compiles: drop --compile 0")
    return problems


def check_projection(hp, flops_per_s, device, world_size, gpu_hour_usd, note):
    seconds = hp["training_flops"] / flops_per_s
    message = (f"{hp['num_iterations']:,} steps, {count(hp['training_tokens'])} tokens, {hp['training_flops']:.2e} FLOPs "
               f"-> ~{duration(seconds)} of training steps")
    if device.type == "cuda":
        message += f", ~${seconds / 3600 * world_size * gpu_hour_usd:,.0f} at ${gpu_hour_usd:.2f}/GPU-hour x {world_size} GPUs"
    else:
        message += " at the burst's FLOP/s (no cost on CPU)"
    return [Row("projection", PASS, message + "; evaluation, CORE and checkpoints come on top" + note)]


# -----------------------------------------------------------------------------
# data

def hub_status():
    try:
        check_hub_reachable(shard_filename(0))
        return "the Hugging Face Hub is reachable for downloads"
    except DataError:
        return "the Hugging Face Hub is NOT reachable from here: copy the shards in"


def check_data(data_dir, tokenizer, training_tokens, data="", text_column="text"):
    """Every source of the run's data: one "data" row, or a "data <name>" row per source of a --data mixture."""
    try:
        sources = resolve_sources(data, data_dir or None, text_column)
    except DataError as e:
        return [Row("data", FAIL, str(e))]
    rows = []
    for source, share in zip(sources, shares(sources)):
        check = "data" if len(sources) == 1 else f"data {source.name}"
        needed = training_tokens and training_tokens * share
        source_rows = check_data_dir(source, tokenizer, needed) if source.kind == "parquet_dir" else check_stream(source)
        rows += [r._replace(check=check) for r in source_rows]
    return rows


def check_stream(source):
    try:
        check_sources([source])
    except DataError as e:
        return [Row("data", FAIL, str(e))]
    return [Row("data", PASS, f"{source.location} streams through `datasets` and has a `{source.text_column}` column "
                              "(size not estimated: a stream's length is unknown until read)")]


def check_data_dir(source, tokenizer, training_tokens):
    """Shards present and readable (every footer, a train and the val row group); enough of them for the run."""
    data_dir, column = source.location, source.text_column
    try:
        train_files, val_files = split_files(list_parquet_files(data_dir))
        row_groups = list_row_groups(train_files + val_files, column)  # opens every footer: catches truncated files
        first_train = next(rg for fi, rg, _ in row_groups if fi == 0)
        sample = read_row_group(train_files[0], first_train, column)
        read_row_group(val_files[0], next(rg for fi, rg, _ in row_groups if fi == len(train_files)), column)
    except (DataError, StopIteration) as e:
        text = str(e) or "a shard has no row groups; remove it"
        return [Row("data", FAIL, f"{text} ({hub_status()})")]
    train_docs = sum(rows for fi, _, rows in row_groups if fi < len(train_files))
    found = f"{len(train_files)} train + 1 val shard(s) in {data_dir}, {train_docs:,} train documents"
    if tokenizer is None or training_tokens is None:
        return [Row("data", PASS, f"{found}, readable (token count not estimated: no tokenizer)")]
    tokens_per_doc = sum(len(ids) for ids in tokenizer.encode(sample, prepend_bos=True)) / max(1, len(sample))
    available = tokens_per_doc * train_docs
    needed = training_tokens / (1 - CROP_LOSS)  # best-fit packing discards part of what it consumes
    found += (f" ~ {count(available)} tokens; the run consumes ~{count(needed)} ({count(training_tokens)} trained, "
              f"~{CROP_LOSS:.0%} of what is read is cropped away)")
    if available >= needed:
        return [Row("data", PASS, found)]
    message = f"{found}: it would repeat the data ~{needed / available:.1f} times"
    if os.path.basename(val_files[0]) == shard_filename(LAST_SHARD_INDEX):  # ClimbMix: say how many shards to fetch
        shards = math.ceil(needed / (available / len(train_files)))
        message += f"; fetch {shards} train shards: python -m nanochat.dataset -n {shards} ({hub_status()})"
    else:
        message += "; add parquet files to --data-dir, or train fewer tokens (--target-param-data-ratio)"
    return [Row("data", WARN, message)]


def check_loader(tokenizer, args, data_dir, rank, world_size, device, needed_tok_per_s):
    """The real DataLoader at the run's B, T on this rank's share: tokens/s against what training consumes per rank."""
    B, T = args.device_batch_size, args.max_seq_len
    sources = resolve_sources(args.data, data_dir or None, args.text_column)
    with DataLoader(tokenizer, B, T, split="train", data=sources, rank=rank, world_size=world_size,
                    device=device) as loader:
        next(loader)  # the first batch fills the document buffer: a one-off cost
        batches, t0 = 0, time.perf_counter()
        while batches < 3 or time.perf_counter() - t0 < LOADER_MIN_SECONDS:
            next(loader)
            batches += 1
        tok_per_s = batches * B * T / (time.perf_counter() - t0)
    message = f"{tok_per_s:,.0f} tok/s per rank at {B}x{T}"
    if needed_tok_per_s is None:
        return [Row("loader", PASS, f"{message} (no burst to compare with)")]
    if tok_per_s < needed_tok_per_s:
        return [Row("loader", WARN, f"{message}, training consumes {needed_tok_per_s:,.0f}: steps would wait for data; use a faster "
                                    "disk, fewer ranks per CPU socket, or more loader threads")]
    return [Row("loader", PASS, f"{message}, {tok_per_s / needed_tok_per_s:.1f}x what the burst consumes")]


# -----------------------------------------------------------------------------
# disk and run directory

def planned_saves(save_every, num_iterations):
    """Checkpoints base_train writes (it deletes none): every save_every steps plus the last; -1 the last only; 0 none."""
    if save_every == 0:
        return 0
    if save_every < 0:
        return 1
    return num_iterations // save_every + (num_iterations % save_every != 0)


def checkpoint_bytes(model, device):
    """Bytes of one checkpoint, all ranks: the fp32 weights plus every rank's MuonAdamW state.

    Measured on the meta-device model and an optimizer built over it (MuonAdamW allocates its
    sharded state up front), so nothing is estimated by hand.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    optimizer = model.setup_optimizer(compiled=False)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return weights + across_ranks(state, dist.ReduceOp.SUM, device)


def existing_parent(path):
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def check_disk(run_dir, bytes_per_save, n_saves):
    where = existing_parent(run_dir)
    free = shutil.disk_usage(where).free
    needed = bytes_per_save * n_saves
    message = f"{gib(free)} free at {where}; checkpoints need {gib(needed)} ({n_saves} x {gib(bytes_per_save)})"
    if free < needed:
        return [Row("disk", FAIL, f"{message}: free space there, pass --run-dir on a bigger disk, or save less often (--save-every)")]
    return [Row("disk", PASS, message)]


def check_run_dir(run_dir, resuming):
    probe = os.path.join(run_dir, f".preflight_{os.getpid()}")
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        return [Row("run dir", FAIL, f"cannot write to {run_dir} ({e.strerror or e}): pass --run-dir DIR (or set NANOCHAT_BASE_DIR) "
                                     "to a writable directory")]
    steps = list_steps(os.path.join(run_dir, "checkpoints"))
    if steps and not resuming:
        return [Row("run dir", WARN, f"{run_dir} already holds checkpoints (steps {steps[0]}..{steps[-1]}) that a fresh run would "
                                     "mix with its own: pass a new --run-dir, or --resume-from-step latest")]
    return [Row("run dir", PASS, f"{run_dir} is writable")]


# -----------------------------------------------------------------------------
# logging

def check_wandb(run, master):
    if not run:
        return [Row("wandb", SKIP, "no --run: no wandb, the local log.jsonl only")]
    if not master:
        return [Row("wandb", SKIP, "only rank 0 logs")]
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "dryrun"):
        return [Row("wandb", PASS, f"WANDB_MODE={mode}: logs stay in the run dir; upload later with `wandb sync`")]
    if mode == "disabled":
        return [Row("wandb", WARN, f"WANDB_MODE=disabled: --run {run} sends nothing to wandb (log.jsonl only); unset it to log")]
    try:
        import wandb
    except ImportError:
        return [Row("wandb", FAIL, "wandb is not installed: pip install wandb, or set WANDB_MODE=disabled")]
    if not wandb.login(prompt=False, verify=False):
        return [Row("wandb", WARN, "no wandb credentials: the run will log offline (upload later with `wandb sync`); "
                                   "run `wandb login` (or set WANDB_API_KEY) to log online")]
    try:
        wandb.login(prompt=False, verify=True)
    except Exception as e:  # network or a rejected key: both stop the run's logging
        return [Row("wandb", WARN, f"credentials found but not verified ({type(e).__name__}: {e}); check the key and "
                                   "network, or set WANDB_MODE=offline")]
    return [Row("wandb", PASS, f"logged in and verified; --run {run} logs online")]


# -----------------------------------------------------------------------------

def run_checks(own, args, dist_info):
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    peak, peak_source = peak_flops(device)
    rows = []
    rows += guarded(["gpu"], check_gpu, device)
    rows += guarded(["software"], check_software, device)
    rows += check_compute_dtype(device)
    rows += check_peak_flops(peak, peak_source)
    tok_rows, tokenizer = check_tokenizer(args.tokenizer_dir)
    rows += tok_rows
    vocab_size = tokenizer.vocab_size if tokenizer else DEFAULT_VOCAB
    if args.device_batch_size == 0:
        rows += guarded(["batch auto"], resolve_auto_batch, args, vocab_size, world_size, device)
        if args.device_batch_size == 0:  # the plan found no batch that fits: nothing below can run
            return rows
    plan_rows, plan = check_run_plan(args, vocab_size, world_size)
    if tokenizer is None:
        plan_rows = [r._replace(message=f"{r.message} (vocab {DEFAULT_VOCAB:,} assumed: no tokenizer)") for r in plan_rows]
    rows += plan_rows
    model, hp = plan or (None, None)
    if model is not None:
        rows += guarded(["memory plan"], check_memory_plan, model, args, world_size, device, dist_info.is_master)
        rows += guarded(["flash attention"], check_flash_attention, device, COMPUTE_DTYPE, model, world_size)
        rows += guarded(["attention"], check_attention_windows, device, COMPUTE_DTYPE, model.config)
    rows += guarded(["fp8"], check_fp8, device, args.fp8, model.config.n_embd if model else 768)
    rows += guarded(["all_reduce", "reduce_scatter", "all_gather"], check_collectives, device)
    rates, note = None, burst_args(args, device)[1]
    if hp is None or own.skip_burst:
        why = "--skip-burst" if own.skip_burst else "needs a valid run plan"
        rows += [Row("throughput", SKIP, why), Row("projection", SKIP, why)]
    else:
        burst_rows, rates = run_burst(args, hp, vocab_size, device, peak, own.burst_steps, own.burst_warmup_steps)
        rows += burst_rows
        rows += check_projection(hp, rates["flops_per_s"], device, world_size, own.gpu_hour_usd, note) if rates else \
            [Row("projection", SKIP, "needs a successful burst")]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += guarded(["data"], check_data, args.data_dir, tokenizer, hp and hp["training_tokens"], args.data, args.text_column)
    if tokenizer is None or any(r.check.startswith("data") and r.status == FAIL for r in rows):
        rows += [Row("loader", SKIP, "needs the tokenizer and data rows to pass")]
    else:
        rows += guarded(["loader"], check_loader, tokenizer, args, args.data_dir, rank, world_size, device,
                        rates and rates["tok_per_s_per_rank"])
    run_dir = base_train.default_run_dir(args)
    if model is not None:
        saves = planned_saves(args.save_every, hp["num_iterations"])
        rows += guarded(["disk"], check_disk, run_dir, checkpoint_bytes(model, device), saves)
    rows += check_run_dir(run_dir, bool(args.resume_from_step))
    rows += guarded(["wandb"], check_wandb, args.run, dist_info.is_master)
    return rows


def merge_rows(per_rank):
    """One row per check over all ranks' rows: the worst status; a message from another rank names it."""
    names = list(dict.fromkeys(row.check for rows in per_rank for row in rows))
    merged = []
    for name in names:
        candidates = [(rank, row) for rank, rows in enumerate(per_rank) for row in rows if row.check == name]
        rank, row = max(candidates, key=lambda c: (SEVERITY[c[1].status], -c[0]))
        merged.append(Row(name, row.status, row.message if rank == 0 else f"rank {rank}: {row.message}"))
    return merged


def gather_rows(rows):
    if not dist.is_initialized():
        return [rows]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, [tuple(r) for r in rows])  # plain tuples: __main__.Row need not unpickle
    return [[Row(*r) for r in rank_rows] for rank_rows in everyone]


def format_table(rows):
    width = max(len(r.check) for r in rows)
    lines = [f"{'check':<{width}}  status  message"]
    lines += [f"{r.check:<{width}}  {r.status:<6}  {r.message}" for r in rows]
    counts = {s: sum(r.status == s for r in rows) for s in (FAIL, WARN, PASS, SKIP)}
    verdict = FAIL if counts[FAIL] else PASS
    lines.append(f"preflight {verdict}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def main(argv=None):
    own, args = parse_args(argv)
    dist_info = init_dist(args.device_type or None)
    print0(f"nanochat preflight: {dist_info.world_size} rank(s) on {dist_info.device.type}; run --depth {args.depth} "
           f"--max-seq-len {args.max_seq_len} --device-batch-size {args.device_batch_size}{' --fp8' if args.fp8 else ''}")
    rows = merge_rows(gather_rows(run_checks(own, args, dist_info)))
    print0(format_table(rows))
    cleanup_dist()
    return 1 if any(r.status == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
