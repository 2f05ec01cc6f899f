"""Train the BPE tokenizer on the train split and save it (default: <base dir>/tokenizer).

    python -m scripts.tok_train                                  # vocab 2^15 on up to 2B chars of the data dir
    python -m scripts.tok_train --data-dir ../shared/data/corpus --vocab-size 8192
    python -m scripts.tok_train --data climbmix:0.7,/data/finepdfs:0.3   # a mixture, shares by characters
"""

import os
import time

from nanochat.cli import ArgumentParser, number, run_main
from nanochat.common import get_base_dir
from nanochat.dataset import DataError
from nanochat.mixture import SPEC_HELP, TEXT_COLUMN, check_sources, iter_mixture_texts, resolve_sources
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, tokenizer_signature

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # byte-level BPE: every byte is a token, then the specials


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


def parse_args(argv=None):
    parser = ArgumentParser(description="Train the byte-level BPE tokenizer (rustbpe) on the train split.")
    parser.add_argument("--vocab-size", type=number(int, low=MIN_VOCAB_SIZE, high=2**31 - 1), default=32768,
                        help="learned ranks + special tokens (2^15)")
    parser.add_argument("--max-chars", type=number(int, low=1), default=2_000_000_000, help="stop after this many characters of text")
    parser.add_argument("--doc-cap", type=number(int, low=1), default=10_000, help="use at most this many characters of each document")
    parser.add_argument("--data-dir", default=None, help="directory of parquet files (default: NANOCHAT_DATA_DIR or <base dir>/base_data)")
    parser.add_argument("--data", default="", help=SPEC_HELP + "; the mixture's shares are taken by characters")
    parser.add_argument("--text-column", default=TEXT_COLUMN, help="text column of every source that names none")
    parser.add_argument("--output-dir", default=None, help="where to save tokenizer.json (default: <base dir>/tokenizer)")
    args = parser.parse_args(argv)
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} is a file, not a directory")
    return args

def main(argv=None):
    args = parse_args(argv)
    output_dir = args.output_dir or os.path.join(get_base_dir(), "tokenizer")
    sources = resolve_sources(args.data, args.data_dir, args.text_column)
    check_sources(sources)
    counts = {"chars": 0, "docs": 0}
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(training_texts(sources, args.max_chars, args.doc_cap, counts),
                                              args.vocab_size)
    train_s = time.perf_counter() - t0
    try:
        path = tokenizer.save(output_dir)
    except OSError as e:  # read-only, full, or a file in the way: the hour of training is not the problem
        raise SystemExit(f"tok_train: cannot save the tokenizer to {output_dir} ({e}): pass a writable --output-dir") from None
    print("data: " + ", ".join(f"{s.name} ({s.location}, weight {s.weight:g})" for s in sources) + " (train splits)")
    print(f"trained on {counts['chars']:,} chars from {counts['docs']:,} documents (doc cap {args.doc_cap:,})")
    print(f"training time: {train_s:.2f} s ({counts['chars'] / train_s / 1e6:.2f} M chars/s)")
    print(f"vocab size: {tokenizer.vocab_size:,} ({tokenizer.vocab_size - 1:,} ranks + <|bos|> = id {tokenizer.bos_token_id})")
    print(f"signature: {tokenizer_signature(tokenizer)}")
    print(f"saved: {path}")


if __name__ == "__main__":
    run_main(main, "tok_train", (DataError, TokenizerError))
