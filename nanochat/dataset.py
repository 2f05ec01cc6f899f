"""Pretraining text on disk: ClimbMix shards or any local directory of parquet files with a text column.

Owns: where the data directory is, which file is validation (the last one, sorted by name),
reading documents by row group with this rank's share of the row groups (optionally in an
order permuted by a data seed), and downloading
ClimbMix shards from the Hugging Face Hub. It never tokenizes.

ClimbMix (shared NOTES.md, "Data"): `karpathy/climbmix-400b-shuffle`, files
`shard_00000.parquet` ... `shard_06542.parquet`, row groups of 1024 documents; the last
shard is the validation split. `python -m nanochat.dataset -n N` downloads shards 0..N-1
plus that validation shard. Mixtures of several sources, and sources read through the
`datasets` library, are nanochat/mixture.py's.

Every bad-input error names the file and what to do about it.
"""

import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.cli import ArgumentParser, number, run_main
from nanochat.common import get_base_dir

HF_REPO_ID = "karpathy/climbmix-400b-shuffle"
LAST_SHARD_INDEX = 6542  # shard_06542.parquet is ClimbMix's validation split
TEXT_COLUMN = "text"
DOWNLOAD_SUBDIR = ".download"  # partial downloads live here, never as *.parquet in the data dir
HOW_TO_GET_DATA = ("download ClimbMix shards with `python -m nanochat.dataset -n 8`, or point --data-dir / "
                   "NANOCHAT_DATA_DIR at a directory of parquet files with a `text` column "
                   "(the repo ships one: data/sample/)")


class DataError(RuntimeError):
    """Bad or missing data; the message names the file and what to do."""


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def resolve_data_dir(data_dir=None):
    """The argument, else NANOCHAT_DATA_DIR, else <base dir>/base_data."""
    return data_dir or os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(get_base_dir(), "base_data")


def list_parquet_files(data_dir=None):
    """Sorted paths of the *.parquet files directly inside the data directory."""
    data_dir = resolve_data_dir(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist: {HOW_TO_GET_DATA}")
    files = sorted(os.path.join(data_dir, name) for name in os.listdir(data_dir) if name.endswith(".parquet"))
    if not files:
        raise DataError(f"no .parquet files in {data_dir}: {HOW_TO_GET_DATA}")
    return files


def split_files(files):
    """(train files, [validation file]): the last file in sorted order is validation."""
    if len(files) < 2:
        raise DataError(f"need at least 2 parquet files (train + the last one as validation), found {len(files)}: "
                        f"{', '.join(files) or '-'}; {HOW_TO_GET_DATA}")
    return files[:-1], files[-1:]


# -----------------------------------------------------------------------------
# reading

def open_parquet(path, column=TEXT_COLUMN):
    """A pyarrow ParquetFile, checked to be readable and to have the text column (`text` unless told)."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file (corrupt or truncated: {e}); delete it and "
                        "re-download it (`python -m nanochat.dataset -n N` resumes), or remove it from the data directory") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(f"{path} has no `{column}` column (columns: {', '.join(names)}); nanochat reads "
                        f"documents from a string column named `{column}`: name the right one (--text-column, or "
                        "SOURCE@COLUMN in --data), rename the column, or remove the file")
    return pf


def list_row_groups(files, column=TEXT_COLUMN):
    """Every (file index, row group index, rows) of the files, in order. Opens each footer once (fails fast)."""
    row_groups = []
    for fi, path in enumerate(files):
        metadata = open_parquet(path, column).metadata
        row_groups += [(fi, rg, metadata.row_group(rg).num_rows) for rg in range(metadata.num_row_groups)]
    return row_groups


def permute_row_groups(row_groups, seed=None):
    """The row groups in an order fixed by `seed`; None or 0 keeps file order.

    Why: one run sees its data in one order, and that order alone moves the final loss (the
    reference's leaderboard spread); a sweep repeats a run under several seeds to measure it.
    Permuted before the rank split, so every rank derives the same order and shares stay disjoint.
    """
    if not seed:
        return list(row_groups)
    permuted = list(row_groups)
    random.Random(seed).shuffle(permuted)  # random.Random(int) is stable across Python versions and platforms
    return permuted


def rank_row_groups(files, rank=0, world_size=1, column=TEXT_COLUMN, data_seed=None):
    """This rank's share: row groups (in `permute_row_groups` order) strided by rank, so ranks are disjoint and cover everything."""
    row_groups = permute_row_groups(list_row_groups(files, column), data_seed)
    if len(row_groups) < world_size:
        raise DataError(f"{len(row_groups)} row group(s) in {', '.join(files)} cannot be shared by {world_size} ranks: "
                        "every rank needs at least one; use more files or smaller row groups")
    return row_groups[rank::world_size]


def read_row_group(path, row_group, text_column=TEXT_COLUMN):
    """The documents (list[str]) of one row group, checked to be non-null UTF-8 text."""
    try:
        column = open_parquet(path, text_column).read_row_group(row_group, columns=[text_column]).column(text_column)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: row group {row_group} cannot be read (corrupt or truncated: {e}); delete the file and "
                        "re-download it, or remove it from the data directory") from None
    if column.null_count:
        raise DataError(f"{path}: row group {row_group} has {column.null_count} null `{text_column}` value(s); "
                        "drop those rows or fill them with text")
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        texts = []
        for i, raw in enumerate(column.to_pylist()):
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: row group {row_group}, row {i} is not UTF-8 ({e}); re-encode the text as "
                                "UTF-8 or remove the file") from None
        return texts
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{path}: column `{text_column}` has type {column.type}, expected string")
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)  # parquet does not enforce UTF-8: a string column can hold any bytes
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: row group {row_group} holds text that is not UTF-8 ({e}); re-encode the text "
                            "as UTF-8 or remove the file") from None
    return column.to_pylist()


def iter_documents(files, rank=0, world_size=1, column=TEXT_COLUMN):
    """One pass over this rank's documents (str), row group by row group."""
    for fi, rg, _ in rank_row_groups(files, rank, world_size, column):
        yield from read_row_group(files[fi], rg, column)


# -----------------------------------------------------------------------------
# download (ClimbMix from the Hugging Face Hub)

def _missing_on_hub_errors():
    """The Hub's answers that no retry can change: no such file, repo or revision (or no access to it)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    return EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError


def _missing_on_hub(filename, e):
    return DataError(f"{HF_REPO_ID} has no {filename} ({type(e).__name__}): shards are 0..{LAST_SHARD_INDEX}; "
                     "check -n, or your Hugging Face access to the dataset")


def check_hub_reachable(filename):
    """Fails in well under a second when offline; hf_hub_download would retry for ~23 s first."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    try:
        get_hf_file_metadata(hf_hub_url(HF_REPO_ID, filename, repo_type="dataset"), timeout=10)
    except _missing_on_hub_errors() as e:
        raise _missing_on_hub(filename, e) from None
    except Exception as e:  # offline mode, DNS, refused connection, other HTTP errors: all mean "cannot download"
        raise DataError(f"cannot reach the Hugging Face Hub to download {HF_REPO_ID} ({type(e).__name__}: {e}). "
                        "Offline? Train on local parquet files instead: pass --data-dir DIR or set "
                        "NANOCHAT_DATA_DIR=DIR (the repo ships data/sample/)") from None


def download_shard(index, data_dir, max_attempts=5):
    """Downloads one shard to data_dir/shard_XXXXX.parquet; returns its path. Resumable, retried, atomic.

    huggingface_hub keeps a partial file under data_dir/.download and resumes it with an HTTP Range
    request from the bytes it already wrote, also on our next attempt (a cut transfer and its Range:
    test_download_resumes_a_dropped_transfer_end_to_end). The file is checked with pyarrow there and
    only then renamed into place, so a *.parquet in data_dir is complete.
    A shard or repo that does not exist is reported at once: retrying cannot fix it.
    """
    from huggingface_hub import hf_hub_download
    filename = shard_filename(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):
        return path
    staging_dir = os.path.join(data_dir, DOWNLOAD_SUBDIR)
    for attempt in range(1, max_attempts + 1):
        try:
            staged = hf_hub_download(HF_REPO_ID, filename, repo_type="dataset", local_dir=staging_dir)
            open_parquet(staged)  # integrity: footer and `text` column readable
            os.replace(staged, path)
            return path
        except _missing_on_hub_errors() as e:
            raise _missing_on_hub(filename, e) from None
        except Exception as e:
            if isinstance(e, DataError):  # a bad file: drop it so the retry fetches it afresh
                os.remove(staged)
            if attempt == max_attempts:
                raise DataError(f"downloading {filename} failed {max_attempts} times, last error: {e}") from e
            time.sleep(2 ** attempt)  # 2, 4, 8, 16 s: rides out rate limits and brief outages


def download_shards(num_train_shards, data_dir=None, num_workers=8):
    """Shards 0..num_train_shards-1 plus the validation shard, in parallel, with a progress bar."""
    from tqdm import tqdm
    data_dir = resolve_data_dir(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    indices = list(range(min(num_train_shards, LAST_SHARD_INDEX))) + [LAST_SHARD_INDEX]
    todo = [i for i in indices if not os.path.exists(os.path.join(data_dir, shard_filename(i)))]
    if todo:
        check_hub_reachable(shard_filename(todo[0]))
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = [pool.submit(download_shard, i, data_dir) for i in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc=f"shards -> {data_dir}", unit="shard"):
            future.result()
    shutil.rmtree(os.path.join(data_dir, DOWNLOAD_SUBDIR), ignore_errors=True)
    return [os.path.join(data_dir, shard_filename(i)) for i in indices]


def main(argv=None):
    """`python -m nanochat.dataset`: a bad flag or a failed download ends in one line that says what to do."""
    parser = ArgumentParser(prog="python -m nanochat.dataset", description=f"Download ClimbMix shards ({HF_REPO_ID}) for pretraining.")
    parser.add_argument("-n", "--num-shards", type=number(int, low=1, high=LAST_SHARD_INDEX), default=8,
                        help="train shards 0..N-1 to fetch (the validation shard is always added); ~170 cover a GPT-2-grade run")
    parser.add_argument("-w", "--num-workers", type=number(int, low=1), default=8, help="parallel downloads")
    parser.add_argument("--data-dir", default=None, help="target directory (default: NANOCHAT_DATA_DIR or <base dir>/base_data)")
    args = parser.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        parser.error(f"--data-dir {data_dir} is a file, not a directory")
    paths = run_main(lambda: download_shards(args.num_shards, data_dir, args.num_workers), "nanochat.dataset", (DataError,))
    print(f"{len(paths)} shards ready in {data_dir}")


if __name__ == "__main__":
    main()
