"""Benchmark the training data loader: packed tokens/s and both crop fractions, best-fit vs greedy.

    python -m scripts.bench_loader                       # T = 512 and 2048, B = 8, batches 200..1000
    python -m scripts.bench_loader --data-dir DIR --tokenizer-dir DIR
    python -m scripts.bench_loader --data DIR_A:0.7,DIR_B:0.3 --packers best_fit   # a mixture

Throughput is what the consumer receives from `next()` with the background thread running
(parquet read + tokenize + pack), after a warm-up, in one process. The d24 speedrun trains
~1.1 M tok/s on an 8-GPU node, ~140 k tok/s per rank: below that the GPU would wait on data.
Crop fractions are summed over the measured window (a warm-up first: long documents pile up in
a best-fit buffer over the first few hundred batches, shared NOTES.md "Data").
"""

import os
import time

from nanochat.cli import ArgumentParser
from nanochat.common import get_base_dir
from nanochat.dataloader import DataLoader
from nanochat.dataset import DataError, resolve_data_dir
from nanochat.mixture import SPEC_HELP, TEXT_COLUMN, check_sources, iter_mixture_texts, resolve_sources
from nanochat.tokenizer import Tokenizer, get_tokenizer, tokenizer_signature

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DATA_DIR = os.path.join(REPO_ROOT, "data", "sample")
D24_TOKENS_PER_S_PER_RANK = 1.1e6 / 8  # shared NOTES.md / issue: the 8xH100 d24 speedrun's training rate


def has_parquet(directory):
    return os.path.isdir(directory) and any(name.endswith(".parquet") for name in os.listdir(directory))


def find_default_data_dir():
    """The configured data dir if it holds parquet, else a shared/data/corpus above the repo, else data/sample."""
    configured = resolve_data_dir()
    if has_parquet(configured):
        return configured, "configured data dir"
    directory = REPO_ROOT
    while True:
        corpus = os.path.join(directory, "shared", "data", "corpus")
        if has_parquet(corpus):
            return corpus, "shared test corpus"
        parent = os.path.dirname(directory)
        if parent == directory:
            return SAMPLE_DATA_DIR, "bundled sample"
        directory = parent


def load_or_train_tokenizer(tokenizer_dir, sources, vocab_size, max_chars):
    try:
        return get_tokenizer(tokenizer_dir), f"loaded from {tokenizer_dir or os.path.join(get_base_dir(), 'tokenizer')}"
    except FileNotFoundError:
        pass
    texts, n_chars = [], 0
    mixture_texts = iter_mixture_texts(sources, doc_cap=10_000)
    for text in mixture_texts:
        texts.append(text)
        n_chars += len(texts[-1])
        if n_chars >= max_chars:
            break
    mixture_texts.close()
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(iter(texts), vocab_size)
    return tokenizer, (f"none found, so trained one on the fly: vocab {vocab_size}, {n_chars / 1e6:.1f} M chars, "
                       f"{time.perf_counter() - t0:.1f} s (not saved; run `python -m scripts.tok_train` for a real one)")


def measure(tokenizer, sources, batch_size, seq_len, packer, warmup_batches, batches, buffer_size):
    """(packed tokens/s, crop fraction, consumed crop fraction, epochs) over the batches after the warm-up."""
    with DataLoader(tokenizer, batch_size, seq_len, data=sources, packer=packer, buffer_size=buffer_size) as loader:
        for _ in range(warmup_batches):
            next(loader)
        totals = dict(packed_tokens=0, cropped_tokens=0, thrown_tokens=0)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(loader)
            for key in totals:
                totals[key] += loader.last_stats[key]
        elapsed_s = time.perf_counter() - t0
        epoch = loader.last_stats["epoch"]
    packed = totals["packed_tokens"]
    return (packed / elapsed_s, totals["cropped_tokens"] / packed,
            totals["thrown_tokens"] / (packed + totals["thrown_tokens"]), epoch)


def main():
    parser = ArgumentParser(description="Benchmark the best-fit packing loader against a greedy-crop baseline.")
    parser.add_argument("--data-dir", default=None, help="parquet directory (default: configured data dir, else a "
                        "shared/data/corpus above the repo, else the bundled data/sample)")
    parser.add_argument("--data", default="", help=SPEC_HELP)
    parser.add_argument("--text-column", default=TEXT_COLUMN, help="text column of every source that names none")
    parser.add_argument("--packers", default="best_fit,greedy", help="comma-separated packers to measure")
    parser.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default: <base dir>/tokenizer; "
                        "if absent a small one is trained on the fly)")
    parser.add_argument("--seq-lens", default="512,2048", help="comma-separated sequence lengths T")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch B")
    parser.add_argument("--warmup-batches", type=int, default=200, help="batches before measuring (buffer fills with long docs)")
    parser.add_argument("--batches", type=int, default=800, help="batches measured after the warm-up")
    parser.add_argument("--buffer-size", type=int, default=1000, help="documents held in the packing buffer")
    parser.add_argument("--fly-vocab-size", type=int, default=8192, help="vocab of the on-the-fly tokenizer")
    parser.add_argument("--fly-max-chars", type=int, default=20_000_000, help="training chars of the on-the-fly tokenizer")
    args = parser.parse_args()

    if args.data:
        data_dir, why = None, "--data"
    elif args.data_dir:
        data_dir, why = args.data_dir, "--data-dir"
    else:
        data_dir, why = find_default_data_dir()
    try:
        sources = resolve_sources(args.data, data_dir, args.text_column)
        check_sources(sources)
        tokenizer, tokenizer_note = load_or_train_tokenizer(args.tokenizer_dir, sources, args.fly_vocab_size,
                                                            args.fly_max_chars)
        seq_lens = [int(t) for t in args.seq_lens.split(",")]
        print("data: " + ", ".join(f"{s.name} ({s.location}, weight {s.weight:g})" for s in sources) + f" ({why})")
        print(f"tokenizer: {tokenizer_note}; vocab {tokenizer.vocab_size}, signature {tokenizer_signature(tokenizer)}")
        print(f"B={args.batch_size}, buffer {args.buffer_size} docs, warm-up {args.warmup_batches} batches, "
              f"measured {args.batches} batches, one process with its prefetch thread, {os.cpu_count()} CPU cores")
        print(f"{'T':>5} {'packer':>9} {'packed tok/s':>13} {'x d24 need':>11} "
              f"{'crop (a) consumed':>18} {'crop (b) packed':>16} {'epoch':>6}")
        for seq_len in seq_lens:
            for packer in args.packers.split(","):
                tok_s, crop_b, crop_a, epoch = measure(tokenizer, sources, args.batch_size, seq_len, packer,
                                                       args.warmup_batches, args.batches, args.buffer_size)
                print(f"{seq_len:>5} {packer:>9} {tok_s:>13,.0f} {tok_s / D24_TOKENS_PER_S_PER_RANK:>10.1f}x "
                      f"{crop_a:>18.1%} {crop_b:>16.1%} {epoch:>6}", flush=True)
    except (DataError, ValueError) as e:
        raise SystemExit(f"bench_loader: {e}") from None
    print(f"d24 speedrun need: ~{D24_TOKENS_PER_S_PER_RANK:,.0f} tok/s per rank (1.1 M tok/s / 8 GPUs)")
    print("crop (a) = tokens thrown away by crops / tokens consumed; crop (b) = packed tokens from cropped documents / "
          "packed tokens")


if __name__ == "__main__":
    main()
