"""dev/make_sample.py: how the bundled sample's train documents are cut into pieces."""

import os
import sys

import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
from make_sample import MAX_CHARS, cut_document  # noqa: E402


def non_space(text):
    return "".join(text.split())


def test_pieces_fit_and_keep_every_character_but_whitespace_in_order():
    sentence = "The whale rose, and the boat went over. "
    text = "\n\n".join(["TITLE", sentence * 40, "short line\nanother line", "x" * 2500, sentence * 3])
    pieces = cut_document(text)
    assert all(0 < len(p) <= MAX_CHARS for p in pieces)
    assert non_space("".join(pieces)) == non_space(text)  # only separators at the cuts are dropped


def test_cuts_fall_on_paragraphs_then_sentences():
    a, b = "a" * 600, "b" * 600
    assert cut_document(f"{a}\n\n{b}") == [a, b]  # two paragraphs that do not fit together
    assert cut_document("short\n\nstory") == ["short\n\nstory"]  # a document that fits stays whole
    prose = " ".join(f"Sentence number {i} ends here." for i in range(100))  # one long paragraph, no line breaks
    pieces = cut_document(prose)
    assert len(pieces) > 1 and all(p.endswith(".") for p in pieces)


def test_the_bundled_sample_is_cut():
    sample = os.path.join(REPO, "data", "sample")
    files = sorted(f for f in os.listdir(sample) if f.endswith(".parquet"))
    *train, val = files
    for name in train:
        texts = pq.read_table(os.path.join(sample, name), columns=["text"]).column("text").to_pylist()
        assert max(map(len, texts)) <= MAX_CHARS
    val_texts = pq.read_table(os.path.join(sample, val), columns=["text"]).column("text").to_pylist()
    assert max(map(len, val_texts)) > MAX_CHARS  # the validation documents stay whole
