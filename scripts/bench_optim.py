"""Benchmarks of MuonAdamW on this machine: optimizer-step speed, and the NorMuon A/B.

--mode step     steps/s of optimizer.step() alone (synthetic gradients) for each --depths model,
                compiled and eager side by side, timed in alternating rounds in one process so
                machine noise hits both alike.
--mode normuon  trains a small GPT on bytes of the shared corpus with plain Muon and with
                NorMuon from the same init, data and schedule, for each seed; prints the final
                train and validation losses (the evidence behind the `normuon` default).

python -m scripts.bench_optim --mode step --depths 4,12
python -m scripts.bench_optim --mode normuon --depth 4 --steps 300 --seeds 0,1,2,3,4,5,6,7
"""

import argparse
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from nanochat import scaling
from nanochat.cli import ArgumentParser
from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import default_orth_dtype


def build_model(depth, vocab_size, sequence_len, seed=0):
    return GPT.build(GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=sequence_len), "cpu", seed=seed)


# -----------------------------------------------------------------------------
# --mode step

def time_steps(optimizer, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - t0) / steps


def bench_step(args):
    print(f"optimizer.step() alone, CPU, {torch.get_num_threads()} threads, orthogonalisation in "
          f"{default_orth_dtype()} (COMPUTE_DTYPE {COMPUTE_DTYPE}), vocab {args.vocab_size}; "
          f"steps/s = median over {args.rounds} alternating rounds")
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        model = build_model(depth, args.vocab_size, sequence_len=256)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        optimizers = {"eager": model.setup_optimizer(compiled=False), "compiled": model.setup_optimizer(compiled=True)}
        # a step's cost grows steeply with depth (d12 ~70x d4 here): fewer timed steps for big models
        steps = max(1, args.steps_at_d1 // (depth * depth))
        t0 = time.perf_counter()
        for opt in optimizers.values():  # warm-up: compiles every shape (cold: ~10-30 s each)
            opt.step()
        warm_s = time.perf_counter() - t0
        times = {name: [] for name in optimizers}
        for _ in range(args.rounds):
            for name, opt in optimizers.items():
                times[name].append(time_steps(opt, steps))
        params = sum(p.numel() for p in model.parameters())
        eager, compiled = (1 / statistics.median(times[n]) for n in ("eager", "compiled"))
        rows.append((depth, params, eager, compiled))
        print(f"d{depth}: {params / 1e6:.1f}M params, {steps} steps x {args.rounds} rounds each, warm-up incl. "
              f"compile {warm_s:.0f} s", flush=True)
        del optimizers, model
    print(f"\n{'model':<6} {'params':>9} {'eager steps/s':>14} {'compiled steps/s':>17} {'speed-up':>9}")
    for depth, params, eager, compiled in rows:
        print(f"d{depth:<5} {params / 1e6:>8.1f}M {eager:>14.3f} {compiled:>17.3f} {compiled / eager:>8.2f}x")


# -----------------------------------------------------------------------------
# --mode normuon

def find_corpus(start=Path(__file__).resolve().parent):
    """shared/data/corpus beside the repo or in any parent directory."""
    for parent in [start, *start.parents]:
        if (parent / "shared" / "data" / "corpus").is_dir():
            return parent / "shared" / "data" / "corpus"
    raise SystemExit("no shared/data/corpus found above this repo: the NorMuon benchmark trains on it")


def corpus_bytes(path, max_bytes):
    """UTF-8 bytes of the documents of one shard, each preceded by a 0 byte (the document separator)."""
    out = bytearray()
    for batch in pq.ParquetFile(path).iter_batches(columns=["text"], batch_size=256):
        for text in batch.column(0).to_pylist():
            out += b"\0" + text.encode("utf-8")
            if len(out) >= max_bytes:
                return torch.frombuffer(out[:max_bytes], dtype=torch.uint8).long()
    return torch.frombuffer(out, dtype=torch.uint8).long()


def random_batch(tokens, batch_size, seq_len, generator):
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    rows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def train_once(args, normuon, seed, train_tokens, val_tokens):
    model = build_model(args.depth, 256, args.seq_len, seed)
    optimizer = model.setup_optimizer(weight_decay=args.weight_decay, compiled=False)
    for group in optimizer.param_groups:
        if group["kind"] == "muon":
            group["normuon"] = normuon
    data_gen = torch.Generator().manual_seed(1000 + seed)  # same batches for both variants of a seed
    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        x, y = random_batch(train_tokens, args.batch_size, args.seq_len, data_gen)
        loss = model(x, y)
        loss.backward()
        optimizer.update_hparams(scaling.lr_multiplier(step, args.steps, args.warmup_steps),
                                 weight_decay_multiplier=scaling.weight_decay_multiplier(step, args.steps),
                                 muon_momentum=scaling.muon_momentum(step, end=0.95, ramp_steps=args.steps / 3))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    val_gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        val = statistics.mean(model(*random_batch(val_tokens, args.batch_size, args.seq_len, val_gen)).item()
                              for _ in range(args.val_batches))
    return statistics.mean(losses[-20:]), val, train_s


def bench_normuon(args):
    if args.weight_decay < 0:
        args.weight_decay = scaling.muon_weight_decay(scaling.scaling_params(args.depth, 256), args.batch_size * args.seq_len, 256)
    shards = sorted(find_corpus().glob("*.parquet"))
    train_tokens = corpus_bytes(shards[0], args.train_bytes)
    val_tokens = corpus_bytes(shards[-1], args.train_bytes // 10)
    print(f"d{args.depth}, bytes as tokens (vocab 256), B={args.batch_size} T={args.seq_len}, {args.steps} steps, "
          f"weight decay {args.weight_decay:.3g}, COMPUTE_DTYPE {COMPUTE_DTYPE}")
    print(f"{'seed':>4} {'variant':<8} {'train loss (last 20)':>21} {'val loss':>9} {'train s':>8}")
    results = {False: [], True: []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for normuon in (False, True):
            train, val, seconds = train_once(args, normuon, seed, train_tokens, val_tokens)
            results[normuon].append((train, val))
            print(f"{seed:>4} {'normuon' if normuon else 'muon':<8} {train:>21.4f} {val:>9.4f} {seconds:>8.1f}", flush=True)
    for normuon, rows in results.items():
        print(f"mean {'normuon' if normuon else 'muon':<8} train {statistics.mean(r[0] for r in rows):.4f} "
              f"val {statistics.mean(r[1] for r in rows):.4f}")
    # same init, data and schedule per seed: the paired difference is the measurement
    val_diffs = [n[1] - m[1] for m, n in zip(results[False], results[True])]
    print("val loss, normuon - muon, per seed: " + ", ".join(f"{d:+.4f}" for d in val_diffs) +
          f" (mean {statistics.mean(val_diffs):+.4f})")


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["step", "normuon"], default="step", help="what to benchmark")
    p.add_argument("--depths", default="4,12", help="step mode: comma-separated model depths")
    p.add_argument("--vocab-size", type=int, default=32768, help="step mode: vocab size (sets embedding sizes)")
    p.add_argument("--rounds", type=int, default=3, help="step mode: alternating timing rounds per variant")
    p.add_argument("--steps-at-d1", type=int, default=200,
                   help="step mode: timed steps per round at depth 1; depth d does this // d^2 (at least 1)")
    p.add_argument("--depth", type=int, default=4, help="normuon mode: model depth")
    p.add_argument("--steps", type=int, default=300, help="normuon mode: training steps per run")
    p.add_argument("--warmup-steps", type=int, default=20, help="normuon mode: LR warmup steps")
    p.add_argument("--batch-size", type=int, default=16, help="normuon mode: sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="normuon mode: bytes per sequence")
    p.add_argument("--weight-decay", type=float, default=-1.0,
                   help="normuon mode: Muon weight decay (-1: the scaling law's 0.22 * (768 / width)^2)")
    p.add_argument("--seeds", default="0,1", help="normuon mode: comma-separated seeds (init and data order)")
    p.add_argument("--train-bytes", type=int, default=4_000_000, help="normuon mode: corpus bytes to sample from")
    p.add_argument("--val-batches", type=int, default=16, help="normuon mode: validation batches")
    args = p.parse_args(argv)
    if args.mode == "step":
        bench_step(args)
    else:
        bench_normuon(args)


if __name__ == "__main__":
    main()
