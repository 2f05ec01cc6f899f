"""Token batches for training: best-fit BOS-aligned packing, crop statistics, exact resume, prefetch.

Pipeline (per rank): for each source of the mixture (mixture.py: a parquet directory, or a
`datasets` stream), this rank's documents tokenized with BOS prepended (int32 arrays) -> that
source's buffer of `buffer_size` whole documents (at most one epoch of this rank's data) ->
rows of exactly T+1 tokens -> (inputs, targets) = the rows shifted by one.

Mixtures: every row comes from one source, picked by `most_behind_source` (the source furthest
below its weight's share of the packed tokens so far). Rows are all T+1 tokens, so the token
shares are exact to within one row, with no RNG; and each row is packed best-fit from its own
source's buffer exactly as a one-source loader would. One source is the same code with one buffer.

Best-fit packing (shared NOTES.md, "Data"): every row starts at a document start, so with
BOS; fill the row with the largest buffered document that fits the space left; when none
fits, crop the shortest one to fill the row exactly and throw away its rest. No padding.
The greedy baseline (`packer="greedy"`) takes documents in stream order and crops whichever
one overflows; it exists to measure against.

Two crop measures, both reported per batch in `last_stats`:
  consumed_crop_fraction = tokens thrown away by crops / tokens consumed from documents
  crop_fraction          = packed tokens that come from cropped documents / packed tokens
Long documents pile up in a best-fit buffer (they leave only when they are the shortest), so
both measures drift upward over the first few hundred batches: measure after a warm-up.

Exact resume: a document is named by its coordinates (file, row group, row; or its index in a
stream) and tokenizes the same every time, so the state is, per source, the read position plus
the coordinates of the buffered documents in insertion order, and the packed-token counts the
mixing rule reads. A background thread runs ahead; every batch it
queues carries the state *after* that batch, and `state_dict()` returns the state of the
last batch the consumer received, never the thread's read-ahead. In a multi-rank run every
rank's state differs: save each, or gather them with `state_dict_all_ranks()` (a collective).
"""

import bisect
import os
import atexit
import queue
import threading
import weakref
from collections import deque

import numpy as np
import torch

from nanochat.mixture import TEXT_COLUMN, VAL_DOCUMENTS, most_behind_source, open_documents, resolve_sources, shares
from nanochat.tokenizer import tokenizer_signature

STATE_VERSION = 2  # 2: per-source positions, buffers and packed-token counts (mixtures)
_OPEN_LOADERS = weakref.WeakSet()  # loaders whose prefetch thread may be running


@atexit.register
def _close_open_loaders():
    """A loader left open at exit still has its daemon thread inside a `datasets`/pyarrow read; torn down mid-read,
    their native threads abort the interpreter ('terminate called without an active exception', exit -6: seen in
    about 1 of 3 runs of test_partly_read_stream_exits_cleanly on an Intel Xeon). atexit runs before that teardown."""
    for loader in list(_OPEN_LOADERS):
        loader.close()


class BestFitPacker:
    """Buffered documents sorted by length: take the largest that fits, else the shortest (to crop)."""

    def __init__(self):
        self._keys = []     # sorted (length, -seq): among equal lengths the oldest sorts last
        self._entries = {}  # seq -> (coord, tokens), in insertion order
        self._next_seq = 0

    def __len__(self):
        return len(self._keys)

    def add(self, coord, tokens):
        seq = self._next_seq
        self._next_seq += 1
        self._entries[seq] = (coord, tokens)
        bisect.insort(self._keys, (len(tokens), -seq))

    def take(self, space):
        """Removes and returns (coord, tokens): the largest document with len <= space, else the shortest.

        Ties go to the oldest document. (length, 0) sorts after every (length, -seq), so
        bisect_right(...) - 1 is the oldest document of the largest length <= the bound.
        """
        i = bisect.bisect_right(self._keys, (space, 0)) - 1
        if i < 0:  # nothing fits: the oldest of the shortest, to be cropped
            i = bisect.bisect_right(self._keys, (self._keys[0][0], 0)) - 1
        _, neg_seq = self._keys.pop(i)
        return self._entries.pop(-neg_seq)

    def coords(self):
        return [coord for coord, _ in self._entries.values()]


class GreedyPacker:
    """The baseline: documents in stream order; the one that overflows the row is cropped."""

    def __init__(self):
        self._fifo = deque()

    def __len__(self):
        return len(self._fifo)

    def add(self, coord, tokens):
        self._fifo.append((coord, tokens))

    def take(self, space):
        return self._fifo.popleft()

    def coords(self):
        return [coord for coord, _ in self._fifo]


PACKERS = {"best_fit": BestFitPacker, "greedy": GreedyPacker}


class DataLoader:
    """Iterator of (inputs, targets), each (B, T) int64, packed best-fit and BOS-aligned, resumable exactly.

    data: a `--data` spec string or a list of mixture.SourceSpec; without it, data_dir (or the
    default data directory) is the one source. rank/world_size pick this rank's strided share of
    every source; data_seed (None/0: file order) permutes the row-group order of parquet
    sources first (dataset.permute_row_groups). device="cuda..." copies each batch through pinned memory with a non-blocking
    copy. prefetch_batches=0 produces batches in the caller's thread (no background thread).
    """

    def __init__(self, tokenizer, batch_size, seq_len, split="train", data_dir=None, rank=0, world_size=1,
                 device="cpu", buffer_size=1000, packer="best_fit", prefetch_batches=4, num_threads=8, data=None,
                 text_column=TEXT_COLUMN, val_documents=VAL_DOCUMENTS, data_seed=None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1 or seq_len < 1 or buffer_size < 1:
            raise ValueError(f"batch_size, seq_len and buffer_size must be >= 1, got {batch_size}, {seq_len}, {buffer_size}")
        if packer not in PACKERS:
            raise ValueError(f"packer must be one of {', '.join(PACKERS)}, got {packer!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.sources = resolve_sources(data or "", data_dir, text_column, val_documents)
        self.source_names = [s.name for s in self.sources]
        self.batch_size, self.seq_len, self.buffer_size = batch_size, seq_len, buffer_size
        self.rank, self.world_size, self.packer_name = rank, world_size, packer
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda"
        self.prefetch_batches = prefetch_batches
        self._documents = []
        try:
            for source in self.sources:
                self._documents.append(open_documents(source, split, tokenizer, rank, world_size, num_threads, data_seed))
        except BaseException:
            self._close_documents()
            raise
        self._shares = shares(self.sources)
        self._packers = [PACKERS[packer]() for _ in self.sources]
        self._packed_tokens = [0] * len(self.sources)
        self._config = {
            "version": STATE_VERSION, "split": split, "data": [s.describe() for s in self.sources],
            "files": [[os.path.basename(f) for f in getattr(d, "files", [])] for d in self._documents],
            "batch_size": batch_size, "seq_len": seq_len, "buffer_size": buffer_size, "packer": packer,
            "rank": rank, "world_size": world_size, "tokenizer": tokenizer_signature(tokenizer),
            "data_seed": data_seed or None,  # a position indexes the permuted order; None = file order (and older states)
        }
        self._state = self._snapshot()  # what the consumer has received so far: nothing
        self.last_stats = {}
        self._thread = None
        self._queue = None
        self._stop = threading.Event()
        self._producer_ahead = False

    # -------------------------------------------------------------------------
    # production (background thread, or the caller's thread when prefetch_batches=0)

    def _snapshot(self):
        return {"position": [d.position() for d in self._documents],
                "buffer": [p.coords() for p in self._packers],
                "packed_tokens": list(self._packed_tokens)}

    def _buffer_cap(self, documents):
        """A buffer bigger than this rank's data would hold several copies of each document and re-read
        the whole share per refill: cap it at one epoch (matters only for tiny data; a training stream's
        length is known only once it has wrapped, so its buffer may hold one repeat before that)."""
        return max(1, min(self.buffer_size, documents.num_documents or self.buffer_size))

    def _take(self, i, space):
        packer, documents = self._packers[i], self._documents[i]
        while len(packer) < self._buffer_cap(documents):
            packer.add(*documents.next_document())
        return packer.take(space)

    def _pack_row(self, row):
        """Fills `row` (a 1-D int64 array) exactly from the source most behind its share.

        Returns (source index, cropped, thrown, documents) token counts."""
        i = most_behind_source(self._packed_tokens, self._shares)
        filled, cropped, thrown, docs = 0, 0, 0, 0
        while filled < len(row):
            space = len(row) - filled
            _, tokens = self._take(i, space)
            docs += 1
            n = min(len(tokens), space)
            row[filled:filled + n] = tokens[:n]
            filled += n
            if n < len(tokens):
                cropped += n
                thrown += len(tokens) - n
        self._packed_tokens[i] += len(row)
        return i, cropped, thrown, docs

    def _produce(self):
        B, T = self.batch_size, self.seq_len
        packed = np.empty((B, T + 1), dtype=np.int64)
        cropped, thrown, docs = 0, 0, 0
        source_tokens, source_docs = [0] * len(self.sources), [0] * len(self.sources)
        for row in packed:
            i, c, t, d = self._pack_row(row)
            cropped, thrown, docs = cropped + c, thrown + t, docs + d
            source_tokens[i] += T + 1
            source_docs[i] += d
        packed = torch.from_numpy(packed)
        # inputs and targets as one contiguous (2, B, T) block: one host-to-device copy, two contiguous views
        pair = torch.empty((2, B, T), dtype=torch.int64, pin_memory=self.pin_memory)
        pair[0] = packed[:, :-1]
        pair[1] = packed[:, 1:]
        n_packed = B * (T + 1)
        stats = {
            "tokens": B * T, "packed_tokens": n_packed, "documents": docs,
            "cropped_tokens": cropped, "thrown_tokens": thrown,
            "crop_fraction": cropped / n_packed,
            "consumed_crop_fraction": thrown / (n_packed + thrown),
            "epoch": max(d.epoch for d in self._documents),
            "source_packed_tokens": dict(zip(self.source_names, source_tokens)),
            "source_documents": dict(zip(self.source_names, source_docs)),
        }
        return pair, stats, self._snapshot()

    def _worker(self):
        try:
            while not self._stop.is_set():
                item = self._produce()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._queue.put(e)

    def _start(self):
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch_batches)
        self._thread = threading.Thread(target=self._worker, name="nanochat-dataloader", daemon=True)
        self._thread.start()
        _OPEN_LOADERS.add(self)

    def _receive(self):
        if self._producer_ahead:
            self._rewind_producer(self._state)
        if self.prefetch_batches <= 0:
            return self._produce()
        if self._thread is None:
            self._start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the dataloader thread stopped without a batch or an error") from None
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    # -------------------------------------------------------------------------
    # consumer API

    def __iter__(self):
        return self

    def __next__(self):
        pair, stats, state = self._receive()
        self._state = state
        self.last_stats = stats
        if self.device.type != "cpu":
            pair = pair.to(self.device, non_blocking=self.pin_memory)
        return pair[0], pair[1]

    def one_pass(self):
        """This loader's batches while this rank has taken at most one epoch's worth of each source's documents.

        For evaluation: the stream wraps forever, so asking a small validation split for more
        tokens than it holds would count its documents several times. With packer="greedy"
        documents are taken in stream order, so no document appears twice; best-fit takes short
        re-read documents before long buffered ones, so with it this only bounds the repeats.
        `one_pass_batches` counts the batches it has yielded, for reporting.
        """
        documents, self.one_pass_batches = dict.fromkeys(self.source_names, 0), 0
        limits = {name: d.num_documents for name, d in zip(self.source_names, self._documents)}
        for batch in self:
            for name, n in self.last_stats["source_documents"].items():
                documents[name] += n
            if any(limits[name] is not None and documents[name] > limits[name] for name in documents):
                return
            self.one_pass_batches += 1
            yield batch

    def state_dict(self):
        """JSON-serialisable state after the last batch returned (this rank only)."""
        return {**self._config, "position": [list(p) for p in self._state["position"]],
                "buffer": [[list(coord) for coord in coords] for coords in self._state["buffer"]],
                "packed_tokens": list(self._state["packed_tokens"])}

    def load_state_dict(self, state):
        """Resumes so the next batch is the one that followed when `state` was taken.

        Accepts this rank's state_dict() or the all-ranks dict of state_dict_all_ranks().
        """
        if "ranks" in state:
            if len(state["ranks"]) != self.world_size:
                raise ValueError(f"loader state was saved with {len(state['ranks'])} ranks, this run has "
                                 f"{self.world_size}: exact resume needs the same world size")
            state = state["ranks"][self.rank]
        mismatched = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self._config.items() if state.get(k) != v]
        if mismatched:
            raise ValueError("loader state does not match this loader (" + "; ".join(mismatched) + "): exact resume "
                             "needs the same data (--data mixture), tokenizer, batch shape and ranks")
        self.close()
        self._rewind_producer(state)

    def state_dict_all_ranks(self):
        """Every rank's state in one dict (a collective: call it on all ranks), for a rank-0-written checkpoint."""
        import torch.distributed as dist
        states = [self.state_dict()]
        if self.world_size > 1:
            states = [None] * self.world_size
            dist.all_gather_object(states, self.state_dict())
        return {"world_size": self.world_size, "ranks": states}

    def close(self):
        """Stops the background thread; the next batch restarts it from the consumer's position."""
        self._stop_thread()
        self._close_documents()

    def _close_documents(self):
        for documents in self._documents:  # no half-read `datasets` iterator may outlive the loader
            documents.close()

    def _stop_thread(self):
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)  # unblock a pending put
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None
        self._producer_ahead = True  # the thread read ahead of the consumer: rewind before producing again

    def _rewind_producer(self, snapshot):
        """Puts every source and buffer where `snapshot` says (re-reading the buffered documents)."""
        self._packers = [PACKERS[self.packer_name]() for _ in self.sources]
        for packer, documents, buffered, position in zip(self._packers, self._documents, snapshot["buffer"],
                                                         snapshot["position"]):
            coords = [tuple(c) for c in buffered]
            for coord, tokens in zip(coords, documents.fetch(coords)):
                packer.add(coord, tokens)
            documents.seek(position)
        self._packed_tokens = list(snapshot["packed_tokens"])
        self._state = self._snapshot()
        self._producer_ahead = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def validation_batches(tokenizer, batch_size, seq_len, data_dir=None, rank=0, world_size=1, device="cpu", **kwargs):
    """A fresh, endless iterator over the validation split: always the same sequence of batches."""
    loader = DataLoader(tokenizer, batch_size, seq_len, split="val", data_dir=data_dir, rank=rank,
                        world_size=world_size, device=device, **kwargs)
    try:
        yield from loader
    finally:
        loader.close()
