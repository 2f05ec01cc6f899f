"""Compression of the trained tokenizer: UTF-8 bytes per token on train and validation text.

    python -m scripts.tok_eval --data-dir ../shared/data/corpus
"""

import os
import time

from nanochat.cli import ArgumentParser, number, run_main
from nanochat.common import get_base_dir
from nanochat.dataset import DataError, iter_documents, list_parquet_files, resolve_data_dir, split_files
from nanochat.tokenizer import TokenizerError, get_tokenizer, tokenizer_signature


def take_texts(files, max_chars):
    texts, n_chars = [], 0
    for text in iter_documents(files):
        texts.append(text)
        n_chars += len(text)
        if n_chars >= max_chars:
            break
    return texts


def parse_args(argv=None):
    parser = ArgumentParser(description="Print the tokenizer's compression (bytes/token) on train and val text.")
    parser.add_argument("--tokenizer-dir", default=None, help="directory with tokenizer.json (default: <base dir>/tokenizer)")
    parser.add_argument("--data-dir", default=None, help="directory of parquet files (default: NANOCHAT_DATA_DIR or <base dir>/base_data)")
    parser.add_argument("--max-chars", type=number(int, low=1), default=20_000_000, help="characters of text to encode per split")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tokenizer = get_tokenizer(args.tokenizer_dir)
    train_files, val_files = split_files(list_parquet_files(args.data_dir))
    splits = {"train": take_texts(train_files, args.max_chars), "val": take_texts(val_files, args.max_chars)}
    print(f"tokenizer: {args.tokenizer_dir or os.path.join(get_base_dir(), 'tokenizer')} "
          f"(vocab {tokenizer.vocab_size:,}, signature {tokenizer_signature(tokenizer)})")
    print(f"data: {resolve_data_dir(args.data_dir)}")
    print(f"{'split':<6} {'docs':>7} {'bytes':>13} {'tokens':>12} {'bytes/token':>12} {'encode MB/s':>12}")
    for split, texts in splits.items():
        t0 = time.perf_counter()
        ids = tokenizer.encode(texts)
        encode_s = time.perf_counter() - t0
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(map(len, ids))
        if n_tokens == 0:
            raise DataError(f"the {split} split holds no text to encode: add documents with non-empty `text`")
        print(f"{split:<6} {len(texts):>7,} {n_bytes:>13,} {n_tokens:>12,} {n_bytes / n_tokens:>12.3f} "
              f"{n_bytes / max(encode_s, 1e-9) / 1e6:>12.1f}")


if __name__ == "__main__":
    run_main(main, "tok_eval", (DataError, TokenizerError))
