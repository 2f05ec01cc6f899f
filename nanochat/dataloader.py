"""Token batches for training: best-fit BOS-aligned packing, crop statistics, exact resume, prefetch.

Pipeline (per rank): this rank's row groups (dataset.py) -> documents tokenized with BOS
prepended (int32 arrays) -> a buffer of `buffer_size` whole documents (at most one epoch of
this rank's data) -> rows of exactly T+1 tokens -> (inputs, targets) = the rows shifted by one.

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

Exact resume: a document is named by its coordinates (file, row group, row) and tokenizes
the same every time, so the state is just the read position plus the coordinates of the
buffered documents, in insertion order. A background thread runs ahead; every batch it
queues carries the state *after* that batch, and `state_dict()` returns the state of the
last batch the consumer received, never the thread's read-ahead. In a multi-rank run every
rank's state differs: save each, or gather them with `state_dict_all_ranks()` (a collective).
"""

import bisect
import os
import queue
import threading
from collections import deque

import numpy as np
import torch

from nanochat.dataset import DataError, list_parquet_files, rank_row_groups, read_row_group, split_files
from nanochat.tokenizer import tokenizer_signature

STATE_VERSION = 1


class DocumentSource:
    """This rank's tokenized documents in a fixed order, forever (epochs wrap), from a resumable position."""

    def __init__(self, files, tokenizer, rank, world_size, num_threads, data_seed=None):
        self.files = files
        self.tokenizer = tokenizer
        self.num_threads = num_threads
        share = rank_row_groups(files, rank, world_size, data_seed)
        self.row_groups = [(fi, rg) for fi, rg, _ in share]
        self.num_documents = sum(rows for _, _, rows in share)  # per epoch
        self.epoch, self.index, self.row = 0, 0, 0  # next document: row `row` of self.row_groups[index]
        self._docs = None  # token lists of the current row group, rows >= self.row still to hand out

    def position(self):
        return [self.epoch, self.index, self.row]

    def seek(self, position):
        epoch, index, row = position
        if not 0 <= index < len(self.row_groups):
            raise DataError(f"loader state points at row group {index} of this rank's {len(self.row_groups)}: "
                            "it belongs to different data; resume with the data directory it was saved with")
        self.epoch, self.index, self.row = epoch, index, row
        self._docs = None

    def _tokenize(self, texts):
        # int32 arrays: a buffer of long documents as Python int lists would take ~36 bytes per token
        return [np.array(ids, dtype=np.int32) for ids in
                self.tokenizer.encode(texts, prepend_bos=True, num_threads=self.num_threads)]

    def next_document(self):
        """((file, row group, row), tokens) of the next document; tokens start with BOS."""
        for _ in range(2 * len(self.row_groups) + 1):  # bounded: a share of empty row groups must not spin
            fi, rg = self.row_groups[self.index]
            if self._docs is None:
                self._docs = self._tokenize(read_row_group(self.files[fi], rg))
            if self.row < len(self._docs):
                break
            self.index, self.row, self._docs = self.index + 1, 0, None
            if self.index == len(self.row_groups):
                self.epoch, self.index = self.epoch + 1, 0
        else:
            files = sorted({self.files[fi] for fi, _ in self.row_groups})
            raise DataError(f"this rank's row groups hold no documents ({', '.join(files)}): add text to the data")
        doc = self._docs[self.row]
        coord = (fi, rg, self.row)
        self.row += 1
        return coord, doc

    def fetch(self, coords):
        """Tokens of the documents at the given coordinates (random access, used to rebuild a buffer)."""
        wanted = {}
        for fi, rg, row in coords:
            wanted.setdefault((fi, rg), []).append(row)
        tokens = {}
        for (fi, rg), rows in wanted.items():
            if not 0 <= fi < len(self.files):
                raise DataError(f"loader state names file #{fi}, the data directory has {len(self.files)} files")
            texts = read_row_group(self.files[fi], rg)
            if max(rows) >= len(texts):
                raise DataError(f"loader state names row {max(rows)} of {self.files[fi]} row group {rg}, "
                                f"which has {len(texts)} rows: the file changed since the state was saved")
            for row, ids in zip(rows, self._tokenize([texts[r] for r in rows])):
                tokens[(fi, rg, row)] = ids
        return [tokens[tuple(c)] for c in coords]


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

    rank/world_size pick this rank's strided share of the row groups; data_seed (None/0: file
    order) permutes the row-group order first (dataset.permute_row_groups). device="cuda..." copies
    each batch through pinned memory with a non-blocking copy. prefetch_batches=0 produces
    batches in the caller's thread (no background thread).
    """

    def __init__(self, tokenizer, batch_size, seq_len, split="train", data_dir=None, rank=0, world_size=1,
                 device="cpu", buffer_size=1000, packer="best_fit", prefetch_batches=4, num_threads=8, data_seed=None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1 or seq_len < 1 or buffer_size < 1:
            raise ValueError(f"batch_size, seq_len and buffer_size must be >= 1, got {batch_size}, {seq_len}, {buffer_size}")
        if packer not in PACKERS:
            raise ValueError(f"packer must be one of {', '.join(PACKERS)}, got {packer!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        train_files, val_files = split_files(list_parquet_files(data_dir))
        self.files = train_files if split == "train" else val_files
        self.batch_size, self.seq_len, self.buffer_size = batch_size, seq_len, buffer_size
        self.rank, self.world_size, self.packer_name = rank, world_size, packer
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda"
        self.prefetch_batches = prefetch_batches
        self._source = DocumentSource(self.files, tokenizer, rank, world_size, num_threads, data_seed)
        # a buffer bigger than this rank's data would hold several copies of each document and
        # re-read the whole share per refill: cap it at one epoch (matters only for tiny data)
        self._buffer_docs = max(1, min(buffer_size, self._source.num_documents))
        self._packer = PACKERS[packer]()
        self._config = {
            "version": STATE_VERSION, "split": split, "files": [os.path.basename(f) for f in self.files],
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
        return {"position": self._source.position(), "buffer": self._packer.coords()}

    def _take(self, space):
        while len(self._packer) < self._buffer_docs:
            self._packer.add(*self._source.next_document())
        return self._packer.take(space)

    def _pack_row(self, row):
        """Fills `row` (a 1-D int64 array) exactly; returns (cropped, thrown, documents) token counts."""
        filled, cropped, thrown, docs = 0, 0, 0, 0
        while filled < len(row):
            space = len(row) - filled
            _, tokens = self._take(space)
            docs += 1
            n = min(len(tokens), space)
            row[filled:filled + n] = tokens[:n]
            filled += n
            if n < len(tokens):
                cropped += n
                thrown += len(tokens) - n
        return cropped, thrown, docs

    def _produce(self):
        B, T = self.batch_size, self.seq_len
        packed = np.empty((B, T + 1), dtype=np.int64)
        cropped, thrown, docs = 0, 0, 0
        for row in packed:
            c, t, d = self._pack_row(row)
            cropped, thrown, docs = cropped + c, thrown + t, docs + d
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
            "epoch": self._source.epoch,
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
        """This loader's batches while this rank has taken at most one epoch's worth of documents.

        For evaluation: the stream wraps forever, so asking a small validation split for more
        tokens than it holds would count its documents several times. With packer="greedy"
        documents are taken in stream order, so no document appears twice; best-fit takes short
        re-read documents before long buffered ones, so with it this only bounds the repeats.
        `one_pass_batches` counts the batches it has yielded, for reporting.
        """
        documents, self.one_pass_batches = 0, 0
        for batch in self:
            documents += self.last_stats["documents"]
            if documents > self._source.num_documents:
                return
            self.one_pass_batches += 1
            yield batch

    def state_dict(self):
        """JSON-serialisable state after the last batch returned (this rank only)."""
        return {**self._config, "position": list(self._state["position"]),
                "buffer": [list(coord) for coord in self._state["buffer"]]}

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
                             "needs the same data, tokenizer, batch shape and ranks")
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
        """Puts the source and the buffer where `snapshot` says (re-reading the buffered documents)."""
        self._packer = PACKERS[self.packer_name]()
        coords = [tuple(c) for c in snapshot["buffer"]]
        for coord, tokens in zip(coords, self._source.fetch(coords)):
            self._packer.add(coord, tokens)
        self._source.seek(snapshot["position"])
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
