"""DataLoader: BOS-aligned best-fit rows of exactly T+1 real tokens, crop statistics, exact resume (1 and 2 ranks)."""

import json
import os
import random
import sys

import pyarrow as pa
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a torchrun worker script, not only under pytest
    sys.path.insert(0, REPO_ROOT)

from nanochat.dataloader import BestFitPacker, DataLoader, validation_batches  # noqa: E402
from nanochat.dataset import DataError  # noqa: E402
from loader_helpers import assert_same_batches, check_two_rank_resume, run_two_rank_resume, take_batches  # noqa: E402


def full_rows(x, y):
    """The packed (B, T+1) rows back from inputs and targets."""
    return torch.cat([x, y[:, -1:]], dim=1)


@pytest.fixture
def tiny_data(tmp_path, write_parquet):
    """3 train files + 1 val file of short tagged documents in row groups of 3: many boundaries and epoch wraps."""
    rng = random.Random(0)
    words = ["whale", "ship", "sea", "Ahab", "the", "of", "and", "harpoon", "1851", "storm", "deck", "—"]
    def doc(tag):
        return f"{tag} " + " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 8, 20, 45, 90])))
    texts = {}
    for f in range(4):
        split = "VAL" if f == 3 else "TRAIN"
        texts[f] = [doc(f"{split}{f}x{i}") for i in range(rng.randint(7, 12))]
        write_parquet(tmp_path / f"shard_{f:05d}.parquet", texts[f], row_group_size=3)
    return str(tmp_path), texts


def test_rows_are_bos_aligned_whole_documents_then_one_crop(tokenizer, tiny_data):
    data_dir, texts = tiny_data
    bos = tokenizer.bos_token_id
    docs = {tuple(tokenizer.encode(t, prepend_bos=True)) for f in range(3) for t in texts[f]}
    B, T = 4, 48
    packed = thrown = 0
    with DataLoader(tokenizer, B, T, data_dir=data_dir, buffer_size=8) as loader:
        for _ in range(25):
            x, y = next(loader)
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
            assert torch.equal(y[:, :-1], x[:, 1:])
            rows = full_rows(x, y)
            assert (rows[:, 0] == bos).all()
            cropped = 0
            for row in rows.tolist():
                starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
                segments = [tuple(row[s:e]) for s, e in zip(starts, starts[1:])]
                assert all(seg in docs for seg in segments[:-1]), "only the last document of a row may be cut"
                if segments[-1] not in docs:  # a crop: the start of a real document, never padding
                    assert any(d[:len(segments[-1])] == segments[-1] for d in docs)
                    cropped += len(segments[-1])
            stats = loader.last_stats
            assert stats["documents"] == (rows == bos).sum().item()
            assert stats["tokens"] == B * T and stats["packed_tokens"] == B * (T + 1)
            assert stats["cropped_tokens"] == cropped
            assert stats["crop_fraction"] == cropped / (B * (T + 1))
            assert stats["consumed_crop_fraction"] == stats["thrown_tokens"] / (B * (T + 1) + stats["thrown_tokens"])
            packed, thrown = packed + B * (T + 1), thrown + stats["thrown_tokens"]
        state = loader.state_dict()
    # token accounting: every document read so far is either packed, thrown away by a crop, or still buffered
    lengths = {}  # (file, row group) -> BOS-prefixed token lengths, in reading order (world size 1: all row groups)
    for f in range(3):
        for rg in range(0, len(texts[f]), 3):
            lengths[f, rg // 3] = [len(d) for d in tokenizer.encode(texts[f][rg:rg + 3], prepend_bos=True)]
    order = list(lengths)
    epoch, index, row = state["position"][0]  # one source
    read = (epoch * sum(map(sum, lengths.values())) + sum(sum(lengths[k]) for k in order[:index])
            + sum(lengths[order[index]][:row]))
    buffered = sum(lengths[fi, rg][r] for fi, rg, r in state["buffer"][0])
    assert epoch >= 1  # wrapped around the train split at least once
    assert read == packed + thrown + buffered


def test_best_fit_matches_naive_scan():
    """The bisect-based buffer makes exactly the choices of a plain scan: largest that fits, else shortest; oldest on ties."""
    rng = random.Random(1)
    packer, naive = BestFitPacker(), []
    for step in range(3000):
        if len(naive) < 30 or rng.random() < 0.5:
            tokens = [0] * rng.randint(1, 60)
            packer.add(step, tokens)
            naive.append((step, tokens))
            continue
        space = rng.randint(1, 70)
        fits = [i for i, (_, t) in enumerate(naive) if len(t) <= space]
        if fits:
            i = max(fits, key=lambda i: (len(naive[i][1]), -i))
        else:
            i = min(range(len(naive)), key=lambda i: (len(naive[i][1]), i))
        assert packer.take(space)[0] == naive.pop(i)[0]
    assert packer.coords() == [c for c, _ in naive]


def crop_fractions(tokenizer, data_dir, seq_len, packer, warmup, batches):
    totals = dict(packed_tokens=0, cropped_tokens=0, thrown_tokens=0)
    with DataLoader(tokenizer, 8, seq_len, data_dir=data_dir, packer=packer) as loader:
        take_batches(loader, warmup)
        for _ in range(batches):
            next(loader)
            for k in totals:
                totals[k] += loader.last_stats[k]
    consumed = totals["packed_tokens"] + totals["thrown_tokens"]
    return totals["thrown_tokens"] / consumed, totals["cropped_tokens"] / totals["packed_tokens"]


@pytest.mark.parametrize("seq_len", [512, 2048])
def test_best_fit_crops_less_than_greedy(tokenizer, corpus_dir, seq_len):
    warmup, batches = (20, 40) if seq_len == 512 else (10, 20)
    best_a, best_b = crop_fractions(tokenizer, corpus_dir, seq_len, "best_fit", warmup, batches)
    greedy_a, greedy_b = crop_fractions(tokenizer, corpus_dir, seq_len, "greedy", warmup, batches)
    print(f"T={seq_len}: consumed crop best-fit {best_a:.3f} vs greedy {greedy_a:.3f}; "
          f"packed crop {best_b:.3f} vs {greedy_b:.3f}")
    assert 0 < best_a < greedy_a


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("data", ["tiny", "corpus"])
def test_exact_resume(tokenizer, tiny_data, corpus_dir, data, world_size):
    """N batches, save, resume in a fresh loader, M more == N + M uninterrupted, with the prefetch thread running ahead."""
    data_dir, seq_len, buffer_size, n, m = ((tiny_data[0], 32, 6, 9, 8) if data == "tiny" else
                                            (corpus_dir, 256, 40, 6, 5))
    kwargs = dict(data_dir=data_dir, world_size=world_size, buffer_size=buffer_size, prefetch_batches=3)
    per_rank = []
    for rank in range(world_size):
        with DataLoader(tokenizer, 4, seq_len, rank=rank, **kwargs) as loader:
            reference = take_batches(loader, n + m)
        with DataLoader(tokenizer, 4, seq_len, rank=rank, **kwargs) as loader:
            first = take_batches(loader, n)
            state = json.loads(json.dumps(loader.state_dict()))
        assert len(state["buffer"][0]) == buffer_size - 1  # waiting documents are part of the state (refill precedes each take)
        with DataLoader(tokenizer, 4, seq_len, rank=rank, **kwargs) as resumed:
            resumed.load_state_dict(state)
            rest = take_batches(resumed, m)
        assert_same_batches(first + rest, reference)
        per_rank.append(reference)
    if world_size == 2:
        assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0]), "ranks must read different data"


def test_close_then_continue_is_seamless(tokenizer, tiny_data):
    with DataLoader(tokenizer, 2, 32, data_dir=tiny_data[0], buffer_size=5) as loader:
        reference = take_batches(loader, 10)
    loader = DataLoader(tokenizer, 2, 32, data_dir=tiny_data[0], buffer_size=5)
    got = take_batches(loader, 4)
    thread = loader._thread
    loader.close()
    assert not thread.is_alive()
    got += take_batches(loader, 6)  # restarts from what the consumer saw, not from the thread's read-ahead
    loader.close()
    assert_same_batches(got, reference)


def test_validation_batches_repeat_and_stay_in_val(tokenizer, tiny_data):
    data_dir, _ = tiny_data
    first = take_batches(validation_batches(tokenizer, 2, 32, data_dir=data_dir), 5)
    again = take_batches(validation_batches(tokenizer, 2, 32, data_dir=data_dir), 5)
    assert_same_batches(first, again)
    val_text = "".join(tokenizer.decode(full_rows(x, y).flatten().tolist()) for x, y in first)
    assert "VAL3x" in val_text and "TRAIN" not in val_text
    with DataLoader(tokenizer, 2, 32, data_dir=data_dir) as loader:
        train_text = "".join(tokenizer.decode(full_rows(x, y).flatten().tolist()) for x, y in take_batches(loader, 20))
    assert "TRAIN" in train_text and "VAL" not in train_text


def test_one_pass_in_stream_order_never_repeats_a_document(tokenizer, tiny_data):
    data_dir, texts = tiny_data
    tags = [f"VAL3x{i} " for i in range(len(texts[3]))]
    for T in (24, 200):  # rows of one cropped document each; rows holding several documents
        with DataLoader(tokenizer, 1, T, split="val", data_dir=data_dir, packer="greedy") as loader:
            batches = list(loader.one_pass())  # the plain stream would wrap forever
            assert len(batches) == loader.one_pass_batches >= 1
        text = "".join(tokenizer.decode(full_rows(x, y).flatten().tolist()) for x, y in batches)
        counts = [text.count(tag) for tag in tags]
        assert max(counts) == 1, counts  # no document twice...
        assert sum(counts) >= len(tags) - 2, counts  # ...and all but the last batch's worth are there


def test_mismatched_state_is_refused(tokenizer, tiny_data):
    data_dir, _ = tiny_data
    with DataLoader(tokenizer, 2, 32, data_dir=data_dir) as loader:
        next(loader)
        state = loader.state_dict()
    with DataLoader(tokenizer, 2, 64, data_dir=data_dir) as other:
        with pytest.raises(ValueError, match="seq_len: saved 32, now 64"):
            other.load_state_dict(state)
    with DataLoader(tokenizer, 2, 32, data_dir=data_dir) as other:
        with pytest.raises(ValueError, match="saved with 2 ranks, this run has 1"):
            other.load_state_dict({"world_size": 2, "ranks": [state, state]})


def test_bad_arguments(tokenizer, tiny_data):
    with pytest.raises(ValueError, match="split must be"):
        DataLoader(tokenizer, 2, 32, split="test", data_dir=tiny_data[0])
    with pytest.raises(ValueError, match="outside world size"):
        DataLoader(tokenizer, 2, 32, data_dir=tiny_data[0], rank=2, world_size=2)


def test_bad_data_surfaces_from_the_prefetch_thread(tokenizer, tmp_path, write_parquet):
    write_parquet(tmp_path / "a.parquet", ["fine text"] * 3 + [b"bad \xff".decode("latin-1")] * 3)
    write_parquet(tmp_path / "b.parquet", [b"ok", b"ok", b"ok", b"broken \xff"], type=pa.binary(), row_group_size=3)
    write_parquet(tmp_path / "z.parquet", ["validation"])
    with DataLoader(tokenizer, 2, 64, data_dir=str(tmp_path), buffer_size=4) as loader:
        with pytest.raises(DataError, match=r"b\.parquet: row group 1, row 0 is not UTF-8"):
            take_batches(loader, 10)


def test_distributed_resume_under_torchrun(tokenizer_dir, corpus_dir, tmp_path):
    """Two gloo ranks: all-ranks state written by rank 0, resumed by both, equals the uninterrupted run."""
    run_two_rank_resume(__file__, [tokenizer_dir, corpus_dir], tmp_path)


def _distributed_worker(tokenizer_dir, data_dir, out_dir):
    from nanochat.common import cleanup_dist, init_dist
    from nanochat.tokenizer import Tokenizer
    info = init_dist("cpu")
    tokenizer = Tokenizer.load(tokenizer_dir)
    kwargs = dict(data_dir=data_dir, rank=info.rank, world_size=info.world_size, buffer_size=40)
    check_two_rank_resume(lambda: DataLoader(tokenizer, 4, 256, **kwargs), 5, 4, out_dir, info.rank)
    cleanup_dist()


if __name__ == "__main__":
    _distributed_worker(*sys.argv[1:4])
