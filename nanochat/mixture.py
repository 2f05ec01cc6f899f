"""Data sources and mixtures: the `--data` spec, each source's documents, and the mixing rule.

Owns: parsing a data spec into `SourceSpec`s, checking every source before anything is built
(`check_sources`), reading one source's tokenized documents for one split and rank, resumably
(`ParquetDocuments` for directories of parquet files, read with pyarrow as dataset.py does;
`StreamDocuments` for everything read through the `datasets` library), the deterministic
token-share rule (`most_behind_source`) and the texts of a mixture for tokenizer training.
dataloader.py packs what these sources hand it; this file never packs.

The spec (`--data`): comma-separated items `SOURCE[@COLUMN][:WEIGHT]`.
  SOURCE   climbmix                   the ClimbMix shards in the default data dir ($NANOCHAT_DATA_DIR or <base>/base_data)
           DIR                        a local directory of parquet files (the last file by name = validation)
           FILE or GLOB               local .parquet/.json/.jsonl(.gz)/.txt file(s), streamed through `datasets`
           hf:OWNER/NAME[/CONFIG][/SPLIT]   a Hugging Face Hub dataset, streamed through `datasets` (split: train)
  @COLUMN  the text column of that source (default: --text-column, itself `text`); a .txt file's is `text`
  :WEIGHT  a number > 0 (default 1); weights are normalised to shares of the packed training tokens.
The weight is the part after the LAST colon; the `hf:` prefix is not one. So a local path that
holds a ':' must carry an explicit weight: `/data/run:3:1` is /data/run:3 at weight 1, while
`/data/run:3` is /data/run at weight 3. '@' starts a column name only after the last '/' (a
directory whose own name holds '@' needs an explicit `@text`).

Validation: a directory's last parquet file (as before); for a `datasets` source, the first
`val_documents` documents of its stream (a fixed slice: streamed sources have no file order to
hold out by), which its training stream then skips.

Ranks: a directory shares row groups strided by rank (dataset.py); a stream shares documents
strided by rank (document i goes to rank i % world_size): every rank reads the whole stream.

Exact resume of a stream: a document is named by its index in this rank's share, so the state
is (epoch, next index, the stream's length once it has wrapped) plus the buffered indices. Resuming re-reads the stream from its start
up to that point (without tokenizing); dev/LOG.md has the cost. A partly consumed `datasets`
iterator can abort the interpreter at exit (NOTES.md), so every iterator here is a generator
closed explicitly in a finally block, and directories never go through `datasets` at all.
"""

import glob
import math
import os
import re
from collections import deque
from dataclasses import dataclass

import numpy as np

from nanochat.dataset import (TEXT_COLUMN, DataError, iter_documents, list_parquet_files, open_parquet,
                              rank_row_groups, read_row_group, resolve_data_dir, split_files)

VAL_DOCUMENTS = 1000  # a streamed source's validation slice: its first documents
STREAM_READ_BATCH = 256  # documents read (and tokenized) at a time from a stream
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
                 ".txt": "text"}
HUB_TIMEOUT_S = 10
SPEC_HELP = ("data mixture: comma-separated SOURCE[@COLUMN][:WEIGHT], SOURCE = climbmix | a parquet dir | "
             ".parquet/.json/.jsonl/.txt file(s) or glob | hf:OWNER/NAME[/CONFIG][/SPLIT]; the weight is the part "
             "after the last ':' (default 1), e.g. climbmix:0.7,/data/finepdfs:0.3 (default: --data-dir as one source)")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mixture. kind: "parquet_dir" (pyarrow) or "datasets" (Hub name or local files)."""
    name: str         # unique within the mixture; logs say val/bpb/<name>
    kind: str
    location: str     # a directory, a Hub name OWNER/NAME, or a file path / glob
    weight: float     # > 0, as given (shares are normalised over the mixture)
    text_column: str = TEXT_COLUMN
    config: str = None     # Hub config name
    hub_split: str = "train"
    builder: str = None    # `datasets` builder for local files: parquet | json | text; None for the Hub
    val_documents: int = VAL_DOCUMENTS

    def describe(self):
        """Identity of the source for signatures and loader states (no machine-specific paths for directories)."""
        where = self.location if self.kind == "datasets" and not self.builder else os.path.basename(os.path.normpath(self.location))
        extra = "" if self.kind == "parquet_dir" else f" val={self.val_documents}"
        if self.config:
            extra += f" config={self.config}"
        if self.builder is None and self.kind == "datasets":
            extra += f" split={self.hub_split}"
        return f"{self.name}={self.kind}:{where}@{self.text_column}:{self.weight:g}{extra}"


def shares(sources):
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


# -----------------------------------------------------------------------------
# parsing

def _split_item(item):
    """(source, column or None, weight) of one spec item; see the module docstring for the rules."""
    body, prefix = (item[3:], "hf:") if item.startswith("hf:") else (item, "")
    weight = 1.0
    if ":" in body:
        body, weight_text = body.rsplit(":", 1)
        try:
            weight = float(weight_text)
        except ValueError:
            raise DataError(f"--data item {item!r}: weight {weight_text!r} is not a number; the weight is the part "
                            f"after the last ':' (a path with ':' needs one: {item}:1)") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise DataError(f"--data item {item!r}: weight {weight_text} must be a number > 0 (it is a share of the "
                            "training tokens; leave the source out instead of weighting it 0)")
    column = None
    tail = body.rsplit("/", 1)[-1]
    if "@" in tail:
        body, column = body.rsplit("@", 1)
        if not column:
            raise DataError(f"--data item {item!r}: empty column name after '@'")
    return prefix + body, column, weight


def _file_builder(path):
    for suffix, builder in sorted(FILE_BUILDERS.items(), key=lambda kv: -len(kv[0])):
        if path.endswith(suffix):
            return builder
    return None


def _source_name(source, kind, config):
    if source == "climbmix":
        base = "climbmix"
    elif kind == "hub":
        base = source[3:].split("/")[1] if "/" in source[3:] else source[3:]
        base += f"-{config}" if config else ""
    else:
        path = os.path.normpath(source)
        if glob.has_magic(os.path.basename(path)):  # /data/notes/*.jsonl -> notes
            path = os.path.dirname(path)
        base = os.path.basename(path)
        for suffix in sorted(FILE_BUILDERS, key=len, reverse=True):
            base = base.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "data"


def parse_data_spec(spec, text_column=TEXT_COLUMN, val_documents=VAL_DOCUMENTS):
    """[SourceSpec] of a `--data` spec. Checks the syntax and that local paths exist; reads no data."""
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise DataError(f"--data {spec!r} has an empty item: give comma-separated SOURCE[@COLUMN][:WEIGHT] items")
    sources, names = [], set()
    for item in items:
        source, column, weight = _split_item(item)
        column = column or text_column
        config, hub_split, builder = None, "train", None
        if source == "climbmix":
            kind, location = "parquet_dir", resolve_data_dir(None)
        elif source.startswith("hf:"):
            parts = source[3:].split("/")
            if len(parts) < 2 or len(parts) > 4 or not all(parts):
                raise DataError(f"--data item {item!r}: a Hub source is hf:OWNER/NAME[/CONFIG][/SPLIT]")
            kind, location = "datasets", "/".join(parts[:2])
            config = parts[2] if len(parts) > 2 else None
            hub_split = parts[3] if len(parts) > 3 else "train"
        elif os.path.isdir(source):
            kind, location = "parquet_dir", source
        elif _file_builder(source):
            if not glob.glob(source):
                raise DataError(f"--data item {item!r}: no file matches {source}; check the path (globs like "
                                "/data/*.jsonl are allowed)")
            kind, location, builder = "datasets", source, _file_builder(source)
            if builder == "text" and column != "text":
                raise DataError(f"--data item {item!r}: a .txt source has one column, `text` (one document per line)")
        else:
            raise DataError(f"--data item {item!r}: unknown source {source!r}: use climbmix, a directory of parquet "
                            "files, .parquet/.json/.jsonl/.txt file(s), or hf:OWNER/NAME[/CONFIG][/SPLIT]")
        name = _source_name(source, "hub" if source.startswith("hf:") else kind, config)
        unique, n = name, 2
        while unique in names:
            unique, n = f"{name}-{n}", n + 1
        names.add(unique)
        sources.append(SourceSpec(unique, kind, location, weight, column, config, hub_split, builder, val_documents))
    return sources


def resolve_sources(data="", data_dir=None, text_column=TEXT_COLUMN, val_documents=VAL_DOCUMENTS):
    """The mixture a script runs on: --data if given, else --data-dir (or the default dir) as one parquet source."""
    if isinstance(data, (list, tuple)):
        return list(data)
    if data and data_dir:
        raise DataError("pass --data or --data-dir, not both (a directory is a --data source: --data DIR:1)")
    if data:
        return parse_data_spec(data, text_column, val_documents)
    location = resolve_data_dir(data_dir or None)
    name = _source_name(location, "parquet_dir", None)
    return [SourceSpec(name, "parquet_dir", location, 1.0, text_column, val_documents=val_documents)]


# -----------------------------------------------------------------------------
# `datasets` streams

def _hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_dataset(name):
    """Fails in well under a second when the Hub is unreachable; load_dataset would retry for ~23 s first."""
    if _hub_offline():
        raise DataError(f"hf:{name} is streamed from the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it, or "
                        "use a local copy (a directory of parquet files, or .parquet/.jsonl files) as the source")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise DataError(f"hf:{name}: no such dataset on the Hugging Face Hub (or no access to it): check the "
                        "name (hf:OWNER/NAME[/CONFIG][/SPLIT]) and your Hub login") from None
    except Exception as e:  # DNS, refused connection, timeout, HTTP errors: all mean "cannot stream it"
        raise DataError(f"cannot reach the Hugging Face Hub for hf:{name} ({type(e).__name__}: {e}). Offline? "
                        "Use a local copy of the data as the source (a parquet directory or .jsonl files)") from None


def open_stream(source):
    """The source as a `datasets` IterableDataset (streaming: nothing is downloaded or converted up front)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if source.builder:
            files = sorted(glob.glob(source.location))
            return datasets.load_dataset(source.builder, data_files=files, split="train", streaming=True)
        check_hub_dataset(source.location)
        return datasets.load_dataset(source.location, source.config, split=source.hub_split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # unknown config or split, unreadable files, ...
        raise DataError(f"source {source.name} ({source.location}) cannot be opened with `datasets` "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the spec") from None


def _stream_batches(dataset, source, first=0):
    """Text columns of the stream, batch by batch, from stream document `first` on: (index of batch[0], texts).

    A generator: close it (or let a for loop finish) so that no `datasets` iterator is left half-consumed.
    """
    iterator = dataset.iter(batch_size=STREAM_READ_BATCH)
    try:
        start = 0
        for batch in iterator:
            if source.text_column not in batch:
                raise DataError(f"source {source.name} ({source.location}) has no `{source.text_column}` column "
                                f"(columns: {', '.join(batch)}): name the right one with "
                                f"{source.location}@COLUMN in --data, or --text-column")
            texts = batch[source.text_column]
            end = start + len(texts)
            if end > first:
                yield max(start, first), texts[max(0, first - start):]
            start = end
    finally:
        iterator.close()


def _checked_text(text, source, index):
    if not isinstance(text, str):
        raise DataError(f"source {source.name}: document {index} of `{source.text_column}` is "
                        f"{type(text).__name__}, not text: drop or fill those rows, or name another column")
    return text


def stream_share_texts(dataset, source, first, stop, rank, world_size, k_from=0):
    """(k, text) of one rank's share of stream documents [first, stop), from share index k_from on; one epoch.

    Document g (first <= g < stop) belongs to rank (g - first) % world_size as its share index
    (g - first) // world_size. A generator: close it.
    """
    base = first + rank
    batches = _stream_batches(dataset, source, base + k_from * world_size)
    try:
        for start, texts in batches:
            offset = (base - start) % world_size  # first document of this batch that is ours
            for i in range(offset, len(texts), world_size):
                g = start + i
                if stop is not None and g >= stop:
                    return
                yield (g - base) // world_size, _checked_text(texts[i], source, g)
    finally:
        batches.close()


class StreamDocuments:
    """This rank's tokenized documents of a `datasets` source in a fixed order, forever, from a resumable position.

    The split is a slice of the stream: validation = documents [0, val_documents), training =
    the rest; this rank's share is every world_size-th of them. Coordinates are (k,): the k-th
    document of this rank's share (the same document every epoch).
    """

    def __init__(self, source, split, tokenizer, rank, world_size, num_threads):
        self.source, self.tokenizer, self.num_threads = source, tokenizer, num_threads
        self.rank, self.world_size = rank, world_size
        self.first = source.val_documents if split == "train" else 0
        self.stop = None if split == "train" else source.val_documents
        self.dataset = open_stream(source)
        self.epoch, self.index = 0, 0  # next document: this rank's share index `index`
        self._batches = None
        self._pending = deque()  # (k, tokens) read ahead within the current batch
        # validation is small: count its share now so one_pass() knows where an epoch ends; a training
        # stream's length is learned when it first wraps (and kept in the position: the loader caps
        # its buffer at one epoch from then on, as it does for a directory)
        self._counted = split == "val"
        self.num_documents = sum(1 for _ in self._share_texts(0)) if self._counted else None
        if self.num_documents == 0:
            raise DataError(f"source {source.name} ({source.location}) has no validation documents for rank {rank}: "
                            f"its first {source.val_documents} documents are the validation slice")

    def _share_texts(self, k_from):
        return stream_share_texts(self.dataset, self.source, self.first, self.stop, self.rank, self.world_size, k_from)

    def position(self):
        return [self.epoch, self.index, 0 if self._counted else self.num_documents or 0]

    def seek(self, position):
        self.close()
        self.epoch, self.index, learned = position
        if not self._counted:
            self.num_documents = learned or None

    def close(self):
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        self._pending.clear()

    def _tokenize(self, texts):
        return [np.array(ids, dtype=np.int32) for ids in
                self.tokenizer.encode(texts, prepend_bos=True, num_threads=self.num_threads)]

    def _refill(self):
        for _ in range(2):  # at most one epoch wrap: an empty share must not spin
            if self._batches is None:
                self._batches = self._share_texts(self.index)
            chunk = []
            for item in self._batches:
                chunk.append(item)
                if len(chunk) == STREAM_READ_BATCH:
                    break
            if chunk:
                ks, texts = zip(*chunk)
                self._pending.extend(zip(ks, self._tokenize(list(texts))))
                return
            self._batches.close()
            self._batches = None
            if self.index == 0:
                break
            self.num_documents = self.num_documents or self.index  # the end of an epoch: now its length is known
            self.epoch, self.index = self.epoch + 1, 0
        raise DataError(f"source {self.source.name} ({self.source.location}) has no documents for rank {self.rank} "
                        f"after its {self.source.val_documents}-document validation slice: use more data or fewer ranks")

    def next_document(self):
        if not self._pending:
            self._refill()
        k, tokens = self._pending.popleft()
        self.index = k + 1
        return (k,), tokens

    def fetch(self, coords):
        """Tokens of the documents at the given coordinates: one read of the stream up to the last of them."""
        wanted = sorted({c[0] for c in coords})
        if not wanted:
            return []
        texts, share = {}, self._share_texts(wanted[0])
        try:
            for k, text in share:
                if k in wanted:
                    texts[k] = text
                if k >= wanted[-1]:
                    break
        finally:
            share.close()
        if len(texts) < len(wanted):
            raise DataError(f"loader state names document {wanted[-1]} of source {self.source.name}'s share, which "
                            "ends sooner: the data changed since the state was saved")
        order = list(texts)
        tokens = dict(zip(order, self._tokenize([texts[k] for k in order])))
        return [tokens[c[0]] for c in coords]


# -----------------------------------------------------------------------------
# parquet directories (pyarrow, no `datasets`)

class ParquetDocuments:
    """This rank's tokenized documents of a parquet directory in a fixed order, forever (epochs wrap).

    Coordinates are (file, row group, row) within the split's files; a document tokenizes the
    same every time, so a position plus buffered coordinates is an exact resume point.
    """

    def __init__(self, source, split, tokenizer, rank, world_size, num_threads, data_seed=None):
        train_files, val_files = split_files(list_parquet_files(source.location))
        self.source, self.files = source, (train_files if split == "train" else val_files)
        self.tokenizer, self.num_threads, self.column = tokenizer, num_threads, source.text_column
        share = rank_row_groups(self.files, rank, world_size, self.column, data_seed)
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
                            "it belongs to different data; resume with the data it was saved with")
        self.epoch, self.index, self.row = epoch, index, row
        self._docs = None

    def close(self):
        pass

    def _tokenize(self, texts):
        # int32 arrays: a buffer of long documents as Python int lists would take ~36 bytes per token
        return [np.array(ids, dtype=np.int32) for ids in
                self.tokenizer.encode(texts, prepend_bos=True, num_threads=self.num_threads)]

    def next_document(self):
        """((file, row group, row), tokens) of the next document; tokens start with BOS."""
        for _ in range(2 * len(self.row_groups) + 1):  # bounded: a share of empty row groups must not spin
            fi, rg = self.row_groups[self.index]
            if self._docs is None:
                self._docs = self._tokenize(read_row_group(self.files[fi], rg, self.column))
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
            texts = read_row_group(self.files[fi], rg, self.column)
            if max(rows) >= len(texts):
                raise DataError(f"loader state names row {max(rows)} of {self.files[fi]} row group {rg}, "
                                f"which has {len(texts)} rows: the file changed since the state was saved")
            for row, ids in zip(rows, self._tokenize([texts[r] for r in rows])):
                tokens[(fi, rg, row)] = ids
        return [tokens[tuple(c)] for c in coords]


def open_documents(source, split, tokenizer, rank=0, world_size=1, num_threads=8, data_seed=None):
    """The document reader of one source for one split ("train" | "val") and rank.

    data_seed permutes a parquet directory's row groups; a `datasets` stream is read in its own
    order whatever the seed (permuting it would mean reading it whole first)."""
    if source.kind == "parquet_dir":
        return ParquetDocuments(source, split, tokenizer, rank, world_size, num_threads, data_seed)
    return StreamDocuments(source, split, tokenizer, rank, world_size, num_threads)


# -----------------------------------------------------------------------------
# mixing and checking

def most_behind_source(packed_tokens, source_shares):
    """Index of the source furthest below its share of the tokens packed so far (ties: the first).

    The deterministic "largest remaining quota" rule: no RNG, so the choice is a function of the
    per-source token counts alone, which the loader state carries; a resume continues exactly.
    After n rows of equal length every source is within one row of its share.
    """
    total = sum(packed_tokens)
    deficits = [share * total - packed for share, packed in zip(source_shares, packed_tokens)]
    return max(range(len(deficits)), key=lambda i: (deficits[i], -i))


def check_sources(sources):
    """Opens every source and reads a document of each split: a bad spec fails here, before a model is built."""
    for source in sources:
        if source.kind == "parquet_dir":
            train_files, val_files = split_files(list_parquet_files(source.location))
            open_parquet(train_files[0], source.text_column)
            open_parquet(val_files[0], source.text_column)
            continue
        share = stream_share_texts(open_stream(source), source, 0, None, 0, 1)
        try:  # the first batch checks the text column; training needs a document after the validation slice
            documents = sum(1 for _, _ in zip(range(source.val_documents + 1), share))
        finally:
            share.close()
        if documents <= source.val_documents:
            raise DataError(f"source {source.name} ({source.location}) has only {documents} documents, all of them "
                            f"taken by its validation slice (the first {source.val_documents}): use more data")


def _texts_only(share):
    try:
        for _, text in share:
            yield text
    finally:
        share.close()


def iter_mixture_texts(sources, doc_cap=None):
    """Training texts of the mixture for tokenizer training, rank 0 of 1, each cut to doc_cap characters.

    Sources take turns by the same rule as the loader, on characters instead of tokens (there is
    no tokenizer yet); the texts end when the first source runs out, so the shares hold.
    """
    readers = []
    for source in sources:
        if source.kind == "parquet_dir":
            files = split_files(list_parquet_files(source.location))[0]
            readers.append(iter_documents(files, column=source.text_column))
        else:
            readers.append(_texts_only(stream_share_texts(open_stream(source), source, source.val_documents, None, 0, 1)))
    chars, source_shares = [0] * len(sources), shares(sources)
    try:
        while True:
            i = most_behind_source(chars, source_shares)
            text = next(readers[i], None)
            if text is None:
                return
            text = text[:doc_cap] if doc_cap else text
            chars[i] += max(1, len(text))
            yield text
    finally:
        for reader in readers:
            reader.close()


def val_identity(source):
    """What a source's validation split is, for run signatures: file names and sizes, or the stream slice."""
    if source.kind == "parquet_dir":
        val_file = split_files(list_parquet_files(source.location))[1][0]
        return [f"{os.path.basename(val_file)}:{os.path.getsize(val_file)}"]
    if source.builder:
        return [f"{os.path.basename(f)}:{os.path.getsize(f)}[first {source.val_documents} docs]"
                for f in sorted(glob.glob(source.location))]
    return [f"hf:{source.location}/{source.config or '-'}/{source.hub_split}[first {source.val_documents} docs]"]
