"""Benchmark one training step: tokens/s, MFU, peak memory, and where the step time goes.

    python -m scripts.bench_train --depth 4 --max-seq-len 256 --device-batch-size 8
    python -m scripts.bench_train --depth 24 --max-seq-len 2048 --device-batch-size 16   # on a GPU

Runs every combination of {eager, compiled} x {fp32, bf16} (fp16 instead of bf16 where bf16 is
unsupported) in one process, on real packed batches, and prints one table. Each row: a fresh
model and optimizer, a warm-up (compile), then timed steps split into data wait (next() on the
loader), forward+backward and optimizer. MFU is against the GPU's bf16 datasheet peak, or on CPU
against the measured matmul peak *in that row's dtype* (the physical limit of that row).
"""

import os
import time

import torch

from nanochat.cli import ArgumentParser
from nanochat.common import autodetect_device_type, measure_cpu_matmul_flops, peak_flops, synchronize
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, GPTConfig
from nanochat.report import model_flops_utilization
from scripts.bench_loader import find_default_data_dir, load_or_train_tokenizer


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) on Linux
            f.write("5")


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:  # peak resident set size of the process since the reset
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return float("nan")


def bench_config(args, tokenizer, data_dir, device, compiled, dtype):
    config = GPTConfig.from_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.max_seq_len,
                                  head_dim=args.head_dim)
    model = GPT.build(config, device, seed=0, compute_dtype=dtype)
    optimizer = model.setup_optimizer(compiled=compiled)
    step_model = torch.compile(model, dynamic=False) if compiled else model
    loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, data_dir=data_dir, device=device)
    timings = {"data": 0.0, "fwd_bwd": 0.0, "optim": 0.0}

    def step(record):
        t0 = time.perf_counter()
        x, y = next(loader)
        t1 = time.perf_counter()
        step_model(x, y).backward()
        synchronize(device)
        t2 = time.perf_counter()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        synchronize(device)
        t3 = time.perf_counter()
        if record:
            timings["data"] += t1 - t0
            timings["fwd_bwd"] += t2 - t1
            timings["optim"] += t3 - t2

    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        step(record=False)
    warmup_s = time.perf_counter() - t0
    reset_peak_memory(device)
    for _ in range(args.steps):
        step(record=True)
    loader.close()
    total_s = sum(timings.values())
    tok_per_s = args.steps * args.device_batch_size * args.max_seq_len / total_s
    peak = peak_flops(device)[0] if device.type == "cuda" else measure_cpu_matmul_flops(dtype)
    return {"mode": "compiled" if compiled else "eager", "dtype": str(dtype).removeprefix("torch."),
            "tok_per_s": tok_per_s, "mfu": model_flops_utilization(model.estimate_flops(), tok_per_s, peak),
            "peak_mem_gib": peak_memory_bytes(device) / 2**30, "warmup_s": warmup_s,
            **{f"{k}_ms": 1000 * v / args.steps for k, v in timings.items()}}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=4, help="model depth")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--max-seq-len", type=int, default=256, help="context length T")
    p.add_argument("--device-batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    p.add_argument("--data-dir", default="", help="parquet shards (default: configured dir, shared corpus, or data/sample)")
    p.add_argument("--tokenizer-dir", default="", help="tokenizer (default: <base>/tokenizer, else a small one is trained)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocab of the tokenizer trained when none is found")
    args = p.parse_args(argv)

    device = torch.device(autodetect_device_type())
    data_dir = args.data_dir or find_default_data_dir()[0]
    tokenizer, source = load_or_train_tokenizer(args.tokenizer_dir or None, data_dir, args.vocab_size, 5_000_000)
    print(f"device {device} | depth {args.depth} | T {args.max_seq_len} | B {args.device_batch_size} | "
          f"threads {torch.get_num_threads()} | tokenizer {source} | data {data_dir}")
    rows = []
    for mode in args.modes.split(","):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            if dtype == torch.float16 and device.type == "cpu":
                continue  # ~100x slower than fp32 on CPU (common.py refuses it there too)
            rows.append(bench_config(args, tokenizer, data_dir, device, mode == "compiled", dtype))
            print(f"  measured {mode} {dtype_name}", flush=True)
    header = f"{'mode':<9} {'dtype':<9} {'tok/s':>9} {'MFU':>6} {'peak mem':>9} {'data ms':>8} {'fwd+bwd ms':>10} {'optim ms':>9} {'warm-up s':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['mode']:<9} {r['dtype']:<9} {r['tok_per_s']:>9,.0f} {mfu:>6} {r['peak_mem_gib']:>7.2f}Gi "
              f"{r['data_ms']:>8.1f} {r['fwd_bwd_ms']:>10.1f} {r['optim_ms']:>9.1f} {r['warmup_s']:>9.1f}")
    return rows


if __name__ == "__main__":
    main()
