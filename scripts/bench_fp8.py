"""Microbenchmark: Float8Linear vs the bf16 Linear, forward + backward, per matmul shape of a GPT.

For each distinct Linear shape of a depth-D model (attention projections, MLP up, MLP down) it
prints the time of one fwd+bwd in bf16 and in fp8, the speedup, achieved TFLOP/s, the bytes
each keeps for backward, and fp8's relative error against bf16 (out, grad_x, grad_w).
The speedup only exists on GPUs with fp8 tensor cores (SM >= 89) and compiled; on CPU fp8 is
slower than bf16, there the script is a smoke test of the numbers it prints.

    python -m scripts.bench_fp8                      # d24 shapes, 32768 rows on CUDA; d4, 1024 rows on CPU
    python -m scripts.bench_fp8 --depth 12 --rows 16384 --no-compile
    python -m scripts.bench_fp8 --cpu-scaled-mm       # CPU: torch._scaled_mm per call, oneDNN on vs off

--cpu-scaled-mm times the single fp8 matmul on CPU both ways torch can run it: oneDNN (taken for
same-dtype fp8 on CPUs with AMX-INT8, e.g. Intel Sapphire Rapids; ~450x slower there) and torch's
own fp32 path, which nanochat.fp8.fp8_scaled_mm forces; it also shows that both give the same
numbers (outputs compared with each other, with the exact product and with a bf16 matmul).
"""

import argparse
import time

import torch

from nanochat.cli import ArgumentParser
from nanochat.common import rel_err
from nanochat.fp8 import E4M3, Float8Linear, fp8_scaled_mm, fp8_supported
from nanochat.gpt import GPTConfig, Linear


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=None, help="model depth whose Linear shapes to time (default: 24 on CUDA, 4 on CPU)")
    parser.add_argument("--rows", type=int, default=None, help="tokens per matmul, batch * sequence (default: 32768 on CUDA, 1024 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to time on (default: cuda if available)")
    parser.add_argument("--iters", type=int, default=20, help="timed fwd+bwd iterations per shape")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first, compile included")
    parser.add_argument("--no-compile", action="store_true", help="time eager layers (fp8 is ~4x slower uncompiled: unfused scaling)")
    parser.add_argument("--cpu-scaled-mm", action="store_true", help="CPU only: time torch._scaled_mm e4m3 per call with oneDNN on and off, "
                        "compare their outputs, and exit")
    return parser.parse_args()


def layer_shapes(depth):
    """{name: (in_features, out_features)} of the fp8-eligible Linears in one block of a depth-D GPT."""
    c = GPTConfig.from_depth(depth).n_embd
    return {"attn c_q/k/v/proj": (c, c), "mlp c_fc": (c, 4 * c), "mlp c_proj": (4 * c, c)}


def fwd_bwd(layer, x, grad_out):
    layer.weight.grad = None
    x.grad = None
    out = layer(x)
    out.backward(grad_out)
    return out


def time_ms(fn, iters, warmup, device):
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters * 1e3


def saved_bytes(layer, x):
    """Bytes autograd keeps for backward of one forward through layer (parameters themselves excluded)."""
    param_ptrs = {p.data_ptr() for p in layer.parameters()}
    total = []

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(total)


def bench_shape(in_features, out_features, rows, args, device):
    torch.manual_seed(0)
    bound = (3 / in_features) ** 0.5
    with torch.device(device):
        bf16_layer = Linear(in_features, out_features)
        torch.nn.init.uniform_(bf16_layer.weight, -bound, bound)
        fp8_layer = Float8Linear.from_linear(bf16_layer)
        x = torch.randn(rows, in_features, dtype=torch.bfloat16, requires_grad=True)
        grad_out = torch.randn(rows, out_features, dtype=torch.bfloat16)
    results = {}
    for name, layer in (("bf16", bf16_layer), ("fp8", fp8_layer)):
        run = layer if args.no_compile else torch.compile(layer, fullgraph=True)
        ms = time_ms(lambda: fwd_bwd(run, x, grad_out), args.iters, args.warmup, device)
        out = fwd_bwd(run, x, grad_out).detach()
        results[name] = dict(ms=ms, grads=(out, x.grad.clone(), layer.weight.grad.clone()),
                             saved=saved_bytes(layer, x))
    flops = 6 * rows * in_features * out_features  # fwd 2MNK + bwd 4MNK
    errors = [rel_err(f, b) for f, b in zip(results["fp8"]["grads"], results["bf16"]["grads"])]
    return results, flops, errors


# (M, K, N) of CPU _scaled_mm calls: the fp8 test's d2 forward (256 rows at width 128, c_q and c_fc), a d4 layer
CPU_SCALED_MM_SHAPES = ((256, 128, 128), (256, 128, 512), (256, 512, 128), (1024, 256, 1024))


def ms_per_call(fn, min_s=1.0):
    """(wall, process CPU) milliseconds per call over >= 2 calls and >= min_s; CPU time is what another job on a
    shared box cannot inflate (but oneDNN's own threads would add to it)."""
    fn()
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while calls < 2 or time.perf_counter() - wall0 < min_s:
        fn()
        calls += 1
    return (time.perf_counter() - wall0) / calls * 1e3, (time.process_time() - cpu0) / calls * 1e3


def to_e4m3(t):
    """t cast to e4m3 with a tensorwise scale (the recipe of nanochat.fp8), and the inverse scale."""
    scale = torch.finfo(E4M3).max / t.abs().amax()
    return (t * scale).to(E4M3), scale.reciprocal()


def bench_cpu_scaled_mm(M, K, N):
    """The forward's fp8 matmul (e4m3 x e4m3 -> bf16, fast accumulation) of one shape, three ways: raw
    torch._scaled_mm with oneDNN on (torch's default), fp8_scaled_mm (oneDNN off), a bf16 mm of the
    unquantised operands. Per-call ms and how the two fp8 outputs differ from each other and the exact product."""
    assert torch.backends.mkldnn.enabled
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    (a, sa), (b, sb) = to_e4m3(a32), to_e4m3(b32)
    b = b.t()  # column-major, as fp8_scaled_mm hands it over
    exact = (a.double() * sa.double()) @ (b.double() * sb.double())
    # error unit: one bf16 rounding step (2^-8) of sum_k |a_ik b_kj|, the size of the terms summed (|exact| can cancel to ~0)
    unit = ((a.double() * sa.double()).abs() @ (b.double() * sb.double()).abs()) * 2.0 ** -8
    calls = {"onednn": lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True),
             "fp8_scaled_mm": lambda: fp8_scaled_mm(a, b, sa, sb, torch.bfloat16, True)}
    a16, b16 = a32.bfloat16(), b32.bfloat16().t()
    calls["bf16"] = lambda: a16 @ b16
    out = {name: fn() for name, fn in calls.items()}
    ms = {name: ms_per_call(fn) for name, fn in calls.items()}
    fp8_out = {k: out[k] for k in ("onednn", "fp8_scaled_mm")}
    return {"ms": ms, "equal": (out["onednn"] == out["fp8_scaled_mm"]).float().mean().item(),
            "diff": ((out["onednn"].double() - out["fp8_scaled_mm"].double()).abs() / unit).max().item(),
            "err": {k: ((v.double() - exact).abs() / unit).max().item() for k, v in fp8_out.items()},
            "rel_vs_bf16": {k: rel_err(v, out["bf16"]) for k, v in fp8_out.items()}}


def main_cpu_scaled_mm():
    torch.set_num_threads(1)
    print(f"CPU fp8 forward matmul e4m3 x e4m3 -> bf16, one thread, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; ms per call, wall / process CPU")
    header = (f"{'M x K x N':>14s} {'oneDNN ms':>17s} {'fp8_scaled_mm ms':>17s} {'bf16 mm ms':>13s} {'equal':>7s} "
              f"{'max diff':>9s} {'err oneDNN / ours':>18s} {'rel vs bf16':>16s}")
    print(header)
    print("-" * len(header))
    for M, K, N in CPU_SCALED_MM_SHAPES:
        r = bench_cpu_scaled_mm(M, K, N)
        ms, err, rel = r["ms"], r["err"], r["rel_vs_bf16"]
        cell = {k: f"{ms[k][0]:.2f} / {ms[k][1]:.2f}" for k in ms}
        print(f"{f'{M}x{K}x{N}':>14s} {cell['onednn']:>17s} {cell['fp8_scaled_mm']:>17s} {cell['bf16']:>13s} "
              f"{r['equal']:7.2%} {r['diff']:9.3f} {err['onednn']:8.3f} / {err['fp8_scaled_mm']:.3f} "
              f"{rel['onednn']:.5f}/{rel['fp8_scaled_mm']:.5f}")
    print("equal: share of bitwise-equal outputs (oneDNN vs fp8_scaled_mm); max diff, err (vs the exact fp64 product of\n"
          "the fp8 operands): max over outputs in units of 2^-8 * sum_k |a_ik b_kj| (one bf16 rounding of the terms' size);\n"
          "rel vs bf16: ||out - bf16 mm|| / ||bf16 mm||, the bf16 mm of the unquantised operands")


def main():
    args = parse_args()
    if args.cpu_scaled_mm:
        return main_cpu_scaled_mm()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    depth = args.depth or (24 if on_cuda else 4)
    rows = args.rows or (32768 if on_cuda else 1024)
    ok, reason = fp8_supported(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if on_cuda else 'CPU'}): fp8 {'ok' if ok else 'unsupported'}, {reason}")
    if not ok:
        raise SystemExit("nothing to benchmark: this device cannot run fp8 matmuls")
    print(f"depth {depth}, {rows} rows, {'eager' if args.no_compile else 'compiled'}, {args.iters} iters after {args.warmup} warmup")
    header = (f"{'layer':18s} {'K x N':>11s} {'bf16 ms':>9s} {'fp8 ms':>9s} {'speedup':>8s} {'bf16 TF/s':>10s} "
              f"{'fp8 TF/s':>9s} {'saved bf16':>11s} {'saved fp8':>10s} {'err out/gx/gw':>20s}")
    print(header)
    print("-" * len(header))
    for name, (k, n) in layer_shapes(depth).items():
        results, flops, errors = bench_shape(k, n, rows, args, device)
        bf16, fp8 = results["bf16"], results["fp8"]
        print(f"{name:18s} {f'{k}x{n}':>11s} {bf16['ms']:9.3f} {fp8['ms']:9.3f} {bf16['ms'] / fp8['ms']:7.2f}x "
              f"{flops / bf16['ms'] / 1e9:10.2f} {flops / fp8['ms'] / 1e9:9.2f} "
              f"{bf16['saved'] / 2**20:9.1f}Mi {fp8['saved'] / 2**20:8.1f}Mi "
              f"{' / '.join(f'{e:.3f}' for e in errors):>20s}")


if __name__ == "__main__":
    main()
