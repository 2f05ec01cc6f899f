"""Microbenchmark: Float8Linear vs the bf16 Linear, forward + backward, per matmul shape of a GPT.

For each distinct Linear shape of a depth-D model (attention projections, MLP up, MLP down) it
prints the time of one fwd+bwd in bf16 and in fp8, the speedup, achieved TFLOP/s, the bytes
each keeps for backward, and fp8's relative error against bf16 (out, grad_x, grad_w).
The speedup only exists on GPUs with fp8 tensor cores (SM >= 89) and compiled; on CPU fp8 is
slower than bf16, there the script is a smoke test of the numbers it prints.

    python -m scripts.bench_fp8                      # d24 shapes, 32768 rows on CUDA; d4, 1024 rows on CPU
    python -m scripts.bench_fp8 --depth 12 --rows 16384 --no-compile
"""

import argparse
import time

import torch

from nanochat.cli import ArgumentParser
from nanochat.common import rel_err
from nanochat.fp8 import Float8Linear, fp8_supported
from nanochat.gpt import GPTConfig, Linear


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=None, help="model depth whose Linear shapes to time (default: 24 on CUDA, 4 on CPU)")
    parser.add_argument("--rows", type=int, default=None, help="tokens per matmul, batch * sequence (default: 32768 on CUDA, 1024 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to time on (default: cuda if available)")
    parser.add_argument("--iters", type=int, default=20, help="timed fwd+bwd iterations per shape")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first, compile included")
    parser.add_argument("--no-compile", action="store_true", help="time eager layers (fp8 is ~4x slower uncompiled: unfused scaling)")
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


def main():
    args = parse_args()
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
