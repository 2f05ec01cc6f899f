"""Train the BPE tokenizer on the train split and save it (default: <base dir>/tokenizer).

    python -m scripts.tok_train                                  # vocab 2^15 on up to 2B chars of the data dir
    python -m scripts.tok_train --data-dir ../shared/data/corpus --vocab-size 8192
    python -m scripts.tok_train --data climbmix:0.7,/data/finepdfs:0.3   # a mixture, shares by characters
"""

import argparse
import os
import time

from nanochat.common import get_base_dir
from nanochat.dataset import DataError
from nanochat.mixture import SPEC_HELP, TEXT_COLUMN, check_sources, iter_mixture_texts, resolve_sources
from nanochat.tokenizer import Tokenizer, tokenizer_signature


def training_texts(sources, max_chars, doc_cap, counts):
    """Documents cut to doc_cap chars, until max_chars in total; counts["chars"/"docs"] tally what was used."""
    texts = iter_mixture_texts(sources, doc_cap)  # one huge document must not dominate the pair counts
    try:
        for text in texts:
            counts["chars"] += len(text)
            counts["docs"] += 1
            yield text
            if counts["chars"] >= max_chars:
                return
    finally:
        texts.close()  # no half-read `datasets` iterator left for the interpreter's exit


def main():
    parser = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer (rustbpe) on the train split.")
    parser.add_argument("--vocab-size", type=int, default=32768, help="learned ranks + special tokens (2^15 by default)")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters of text")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters of each document")
    parser.add_argument("--data-dir", default=None, help="directory of parquet files (default: NANOCHAT_DATA_DIR or <base dir>/base_data)")
    parser.add_argument("--data", default="", help=SPEC_HELP + "; the mixture's shares are taken by characters")
    parser.add_argument("--text-column", default=TEXT_COLUMN, help="text column of every source that names none")
    parser.add_argument("--output-dir", default=None, help="where to save tokenizer.json (default: <base dir>/tokenizer)")
    args = parser.parse_args()
    if args.max_chars < 1 or args.doc_cap < 1:
        parser.error("--max-chars and --doc-cap must be >= 1")

    output_dir = args.output_dir or os.path.join(get_base_dir(), "tokenizer")
    try:
        sources = resolve_sources(args.data, args.data_dir, args.text_column)
        check_sources(sources)
        counts = {"chars": 0, "docs": 0}
        t0 = time.perf_counter()
        tokenizer = Tokenizer.train_from_iterator(training_texts(sources, args.max_chars, args.doc_cap, counts),
                                                  args.vocab_size)
        train_s = time.perf_counter() - t0
    except (DataError, ValueError) as e:
        raise SystemExit(f"tok_train: {e}") from None
    path = tokenizer.save(output_dir)
    print("data: " + ", ".join(f"{s.name} ({s.location}, weight {s.weight:g})" for s in sources) + " (train splits)")
    print(f"trained on {counts['chars']:,} chars from {counts['docs']:,} documents (doc cap {args.doc_cap:,})")
    print(f"training time: {train_s:.2f} s ({counts['chars'] / train_s / 1e6:.2f} M chars/s)")
    print(f"vocab size: {tokenizer.vocab_size:,} ({tokenizer.vocab_size - 1:,} ranks + <|bos|> = id {tokenizer.bos_token_id})")
    print(f"signature: {tokenizer_signature(tokenizer)}")
    print(f"saved: {path}")


if __name__ == "__main__":
    main()
