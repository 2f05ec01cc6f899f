"""Shared pytest fixtures: where test data lives, a small trained tokenizer, a parquet writer.

Data: the shared public-domain corpus (`shared/data/corpus`, found by walking up from the
repo root, else /work/shared/data/corpus), falling back to the repo's bundled data/sample.
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DATA_DIR = os.path.join(REPO_ROOT, "data", "sample")
TEST_VOCAB_SIZE = 2048       # small: trains in ~1 s, still merges real words
TEST_TOKENIZER_CHARS = 3_000_000


def _has_parquet(directory):
    return os.path.isdir(directory) and any(name.endswith(".parquet") for name in os.listdir(directory))


def find_corpus_dir():
    directory = REPO_ROOT
    while True:
        candidate = os.path.join(directory, "shared", "data", "corpus")
        if _has_parquet(candidate):
            return candidate
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for candidate in ("/work/shared/data/corpus", SAMPLE_DATA_DIR):
        if _has_parquet(candidate):
            return candidate
    raise RuntimeError("no test corpus: neither shared/data/corpus above the repo nor data/sample exists")


@pytest.fixture(scope="session")
def corpus_dir():
    """A directory of parquet shards with a `text` column (last file = validation)."""
    return find_corpus_dir()


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    """A vocab-2048 BPE tokenizer trained on ~3 M chars of the corpus' train split (session-wide, ~1 s)."""
    from nanochat.dataset import iter_documents, list_parquet_files, split_files
    from nanochat.tokenizer import Tokenizer

    def texts():
        n_chars = 0
        for text in iter_documents(split_files(list_parquet_files(corpus_dir))[0]):
            yield text[:10_000]
            n_chars += min(len(text), 10_000)
            if n_chars >= TEST_TOKENIZER_CHARS:
                return
    return Tokenizer.train_from_iterator(texts(), TEST_VOCAB_SIZE)


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    """The session tokenizer saved to disk (for subprocess tests)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(directory)
    return str(directory)


@pytest.fixture
def write_parquet():
    """write_parquet(path, texts, row_group_size=4, type=pa.string()) -> path: a small `text` parquet file."""
    def write(path, texts, row_group_size=4, type=pa.string(), column="text"):
        pq.write_table(pa.table({column: pa.array(texts, type=type)}), str(path), row_group_size=row_group_size)
        return str(path)
    return write
