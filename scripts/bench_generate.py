"""Generation speed: the KV-cache engine against recomputing the whole context per token.

For each --depths model (default aspect ratio and head dim, random init with every output
projection perturbed so the tokens vary), batch 1: a --prompt-tokens prompt, --new-tokens greedy
tokens, both ways; warm-up once, then --repeats timed runs each, alternating, median tokens/s.
"same" says whether both ways produced the same tokens (they compute the same logits).

python -m scripts.bench_generate                        # d4 and d8, vocab 4096, T 512, 256 new tokens
python -m scripts.bench_generate --depths 4 --repeats 3 --device cuda
"""

import statistics
import time

import torch

from nanochat import engine
from nanochat.cli import ArgumentParser, number, run_main
from nanochat.common import COMPUTE_DTYPE, synchronize
from nanochat.gpt import GPT, GPTConfig


def parse_args(argv=None):
    p = ArgumentParser(description="Tokens/s of cached vs full-recompute generation.")
    p.add_argument("--depths", default="4,8", help="comma-separated model depths")
    p.add_argument("--vocab-size", type=number(int, low=2), default=4096, help="vocabulary size")
    p.add_argument("--sequence-len", type=number(int, low=2), default=512, help="the model's context T")
    p.add_argument("--prompt-tokens", type=number(int, low=1), default=16, help="prompt length")
    p.add_argument("--new-tokens", type=number(int, low=1), default=256, help="greedy tokens generated per run")
    p.add_argument("--repeats", type=number(int, low=1), default=5, help="timed runs per way (after one warm-up)")
    p.add_argument("--device", default="cpu", help="torch device")
    args = p.parse_args(argv)
    if args.prompt_tokens + args.new_tokens - 1 > args.sequence_len:
        p.error(f"--prompt-tokens + --new-tokens - 1 must fit --sequence-len {args.sequence_len}")
    return args


def recompute(model, prompt, new_tokens):
    """Greedy tokens re-running the whole context at every step (what GPT.generate did before the engine)."""
    ids = torch.tensor([prompt], device=model.wte.weight.device)
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(prompt):].tolist()


def cached(model, prompt, new_tokens):
    return engine.generate(model, [prompt], new_tokens)[0]


def timed(fn, model, prompt, new_tokens, device):
    synchronize(device)
    t0 = time.perf_counter()
    tokens = fn(model, prompt, new_tokens)
    synchronize(device)
    return time.perf_counter() - t0, tokens


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, {COMPUTE_DTYPE}, vocab {args.vocab_size}, "
          f"T {args.sequence_len}, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, batch 1, "
          f"median of {args.repeats}")
    print(f"{'depth':>5} {'width':>5} {'params':>8} {'cached tok/s':>13} {'recompute tok/s':>16} {'speedup':>8} {'same':>5}")
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        config = GPTConfig.from_depth(depth, vocab_size=args.vocab_size, sequence_len=args.sequence_len)
        model = GPT.build(config, device, seed=0)
        g = torch.Generator(device=device).manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, device=device).to(p.dtype) * 0.02)
        prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(2)).tolist()
        times = {cached: [], recompute: []}
        tokens = {fn: timed(fn, model, prompt, args.new_tokens, device)[1] for fn in times}  # warm-up
        for _ in range(args.repeats):
            for fn in times:  # alternating: machine noise hits both ways alike
                times[fn].append(timed(fn, model, prompt, args.new_tokens, device)[0])
        rate = {fn: args.new_tokens / statistics.median(t) for fn, t in times.items()}
        params = sum(p.numel() for p in model.parameters())
        same = tokens[cached] == tokens[recompute]
        print(f"{depth:>5} {config.n_embd:>5} {params / 1e6:>7.1f}M {rate[cached]:>13.1f} {rate[recompute]:>16.1f} "
              f"{rate[cached] / rate[recompute]:>7.1f}x {'yes' if same else 'no':>5}")
        rows.append(dict(depth=depth, cached=rate[cached], recompute=rate[recompute], same=same))
    return rows


if __name__ == "__main__":
    run_main(main, "bench_generate", ())
