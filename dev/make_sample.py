"""Builds data/sample/ from the shared corpus: the train shards cut into short documents, the val shard as is.

    python dev/make_sample.py --corpus ../shared/data/corpus --out data/sample

Why cut: the loader packs best-fit and BOS-aligned (dataloader.py), so a document longer than a row (T + 1
tokens) is cropped to its start and the rest is thrown away. 92% of the sample's documents are longer than
1,000 characters (median ~3,500: chapters, plays, addresses), so at the CPU preset's T = 256 about 3/4 of the
text never reached the model: the preset saw the same ~1,100 document openings 4-5 times in 300 steps, a
memorising regime (dev/LOG.md 2026-12-03). Cut at paragraph boundaries into pieces of at most MAX_CHARS
(about one row of T = 256 tokens: ~3.5 bytes per token with the preset's 4096-token tokenizer), nearly every
character is trained on.

The validation shard is copied byte for byte, so val bpb stays comparable with runs on the uncut sample.
"""

import argparse
import os
import random
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

TRAIN_SHARDS = ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
VAL_SHARD = "shard_00007.parquet"  # the corpus's validation shard: last by name, nanochat's rule
MAX_CHARS = 1000
SHUFFLE_SEED = 42  # the corpus's own document shuffle used 42 too
ROW_GROUP_DOCUMENTS = 1024  # ~0.8 MB of text a group, about what 128 whole documents of the corpus hold


def split_long(text, max_chars):
    """Pieces of at most max_chars: at line breaks, else after sentences (punctuation kept), else between words."""
    for pattern, joiner in (("\n", "\n"), (r"(?<=[.!?]) ", " "), (" ", " ")):
        parts = re.split(pattern, text)
        if len(parts) > 1:
            break
    else:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    pieces, current = [], ""
    for part in parts:
        for sub in split_long(part, max_chars) if len(part) > max_chars else [part]:
            candidate = current + joiner + sub if current else sub
            if len(candidate) <= max_chars:
                current = candidate
            else:
                pieces.append(current)
                current = sub
    return pieces + [current] if current else pieces


def cut_document(text, max_chars=MAX_CHARS):
    """Consecutive paragraphs joined while they fit in max_chars; a longer paragraph is split by split_long."""
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        for part in split_long(paragraph, max_chars) if len(paragraph) > max_chars else [paragraph]:
            candidate = current + "\n\n" + part if current else part
            if len(candidate) <= max_chars:
                current = candidate
            else:
                pieces.append(current)
                current = part
    if current:
        pieces.append(current)
    return [p for p in pieces if p.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="the shared corpus directory (parquet shards with a 'text' column)")
    p.add_argument("--out", required=True, help="output directory (data/sample)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in TRAIN_SHARDS:
        documents = pq.read_table(os.path.join(args.corpus, name), columns=["text"]).column("text").to_pylist()
        pieces = [piece for text in documents for piece in cut_document(text)]
        # shuffled within the shard: in document order a row group (and the loader's best-fit buffer of 1,000
        # documents) held the pieces of only ~100 documents, so consecutive batches shared a book and a topic
        random.Random(SHUFFLE_SEED).shuffle(pieces)
        pq.write_table(pa.table({"text": pieces}), os.path.join(args.out, name), row_group_size=ROW_GROUP_DOCUMENTS,
                       compression="zstd", compression_level=19, use_dictionary=False)  # 19: about the corpus's size
        print(f"{name}: {len(documents)} documents -> {len(pieces)} pieces, "
              f"{sum(map(len, documents)):,} -> {sum(map(len, pieces)):,} characters")
    shutil.copyfile(os.path.join(args.corpus, VAL_SHARD), os.path.join(args.out, VAL_SHARD))
    print(f"{VAL_SHARD}: copied")


if __name__ == "__main__":
    main()
