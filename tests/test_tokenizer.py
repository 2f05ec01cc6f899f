"""Tokenizer: lossless round trip, special tokens, byte lengths, rustbpe parity, safe save/load, scripts."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.dataset import iter_documents, list_parquet_files
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer, get_tokenizer, tokenizer_signature

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_every_document(tokenizer, corpus_dir):
    docs = list(iter_documents(list_parquet_files(corpus_dir)))
    assert len(docs) > 1000
    ids = tokenizer.encode(docs, num_threads=4)
    mismatched = [i for i, (doc, row) in enumerate(zip(docs, ids)) if tokenizer.decode(row) != doc]
    assert not mismatched, f"{len(mismatched)} documents do not round-trip, e.g. #{mismatched[:5]}"
    assert sum(map(len, ids)) < sum(len(d.encode()) for d in docs) / 2.5  # it compresses (>2.5 bytes/token)


def test_special_tokens_after_learned_ranks(tokenizer):
    assert tokenizer.vocab_size == 2048
    assert tokenizer.bos_token_id == len(tokenizer.mergeable_ranks) == 2047
    assert tokenizer.decode([tokenizer.bos_token_id]) == "<|bos|>"
    # the special's text inside a document stays ordinary text: data cannot forge a BOS
    assert tokenizer.bos_token_id not in tokenizer.encode("a <|bos|> b")
    assert tokenizer.encode("hi there", prepend_bos=True) == [tokenizer.bos_token_id] + tokenizer.encode("hi there")
    batch = tokenizer.encode(["one", "two three"], prepend_bos=True)
    assert [row[0] for row in batch] == [tokenizer.bos_token_id] * 2
    assert batch == [tokenizer.encode(t, prepend_bos=True) for t in ["one", "two three"]]
    with pytest.raises(TypeError, match="str or a list"):
        tokenizer.encode(b"bytes")


def test_token_bytes_sum_to_utf8_length(tokenizer):
    token_bytes = tokenizer.token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (tokenizer.vocab_size,)
    assert token_bytes[tokenizer.bos_token_id] == 0
    assert (token_bytes[:256] == 1).all() and (token_bytes[:tokenizer.bos_token_id] >= 1).all()
    text = "Café — naïve 東京 🚀 The Whale, 1851."
    ids = tokenizer.encode(text, prepend_bos=True)
    assert token_bytes[torch.tensor(ids)].sum().item() == len(text.encode("utf-8"))


def test_digits_grouped_at_most_two():
    """Trained on nothing but numbers, BPE learns 2-digit tokens and never 3-digit ones (the split regex forbids them)."""
    import random
    rng = random.Random(0)
    texts = [" ".join(str(rng.randrange(10**6)) for _ in range(200)) for _ in range(50)]
    tok = Tokenizer.train_from_iterator(iter(texts), 350)  # {1,3} would learn 3-digit tokens here
    digit_tokens = [t.strip() for t in tok.mergeable_ranks if t.strip().isdigit()]
    assert max(map(len, digit_tokens)) == 2
    pieces = [tok.decode([i]) for i in tok.encode("year 17901 and 123456789")]
    assert max(len(p.strip()) for p in pieces if p.strip().isdigit()) == 2


def test_tiktoken_matches_rustbpe(corpus_dir):
    """The tiktoken Encoding built from rustbpe's ranks and pattern encodes exactly like rustbpe."""
    import rustbpe
    texts = []
    for text in iter_documents(list_parquet_files(corpus_dir)[:1]):
        texts.append(text)
        if sum(map(len, texts)) > 400_000:
            break
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), 700, pattern=SPLIT_PATTERN)
    ours = Tokenizer({bytes(t): r for t, r in bpe.get_mergeable_ranks()})
    probe = texts[:50] + ["x 1234567 y", "  \n\n\tindent", "it's they'll WE'RE"]
    assert [bpe.encode(t) for t in probe] == ours.encode(probe)


def test_save_load_is_json_and_exact(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path)
    with open(path) as f:
        state = json.load(f)  # plain data: loading executes nothing
    assert state["special_tokens"] == ["<|bos|>"] and len(state["ranks"]) == 2047
    loaded = Tokenizer.load(tmp_path)
    assert tokenizer_signature(loaded) == tokenizer_signature(tokenizer)
    text = "Call me Ishmael. Some years ago—never mind how long precisely"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert torch.equal(loaded.token_bytes(), tokenizer.token_bytes())


def test_signature_tells_tokenizers_apart(tokenizer):
    other = Tokenizer(dict(list(tokenizer.mergeable_ranks.items())[:1000]))
    assert len(tokenizer_signature(tokenizer)) == 16
    assert tokenizer_signature(other) != tokenizer_signature(tokenizer)


def test_failed_save_keeps_the_good_file(tokenizer, tmp_path, monkeypatch):
    tokenizer.save(tmp_path)
    good = (tmp_path / "tokenizer.json").read_text()

    def broken_dump(obj, f):
        f.write('{"format": "nanochat-bpe-1", "ran')
        raise OSError("disk full")
    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        tokenizer.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == good


def test_load_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer file"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="rerun `python -m scripts.tok_train`"):
        Tokenizer.load(tmp_path)


def test_training_refuses_impossible_vocab():
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train_from_iterator(iter(["abc"]), 200)
    with pytest.raises(ValueError, match="train on more text"):
        Tokenizer.train_from_iterator(iter(["tiny text, tiny text"]), 1000)


def test_tok_train_and_tok_eval_scripts(corpus_dir, tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    train = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--data-dir", corpus_dir, "--vocab-size", "512",
                            "--max-chars", "500000"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr
    assert "training time:" in train.stdout and "vocab size: 512" in train.stdout
    assert Tokenizer.load(tmp_path / "tokenizer").vocab_size == 512  # default output: <base dir>/tokenizer
    evaluate = subprocess.run([sys.executable, "-m", "scripts.tok_eval", "--data-dir", corpus_dir, "--max-chars", "300000"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert evaluate.returncode == 0, evaluate.stderr
    rows = {line.split()[0]: line.split() for line in evaluate.stdout.splitlines() if line.split()[:1] in (["train"], ["val"])}
    assert set(rows) == {"train", "val"}
    assert all(2.0 < float(row[4]) < 5.0 for row in rows.values())  # bytes/token of a 512-vocab BPE on English
