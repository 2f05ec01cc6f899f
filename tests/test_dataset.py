"""Dataset: directory resolution, train/val split, rank striding, clear errors for bad input, download safety."""

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from nanochat import dataset
from nanochat.dataset import (DataError, iter_documents, list_parquet_files, list_row_groups, rank_row_groups,
                              read_row_group, resolve_data_dir, split_files)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    assert resolve_data_dir() == str(tmp_path / "base" / "base_data")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", "/from/env")
    assert resolve_data_dir() == "/from/env"
    assert resolve_data_dir("/from/arg") == "/from/arg"


def test_list_and_split(tmp_path, write_parquet):
    for name in ["shard_00002.parquet", "shard_00000.parquet", "shard_06542.parquet"]:
        write_parquet(tmp_path / name, ["doc"])
    (tmp_path / "notes.txt").write_text("ignored")
    files = list_parquet_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["shard_00000.parquet", "shard_00002.parquet", "shard_06542.parquet"]
    train, val = split_files(files)
    assert train == files[:2] and val == files[2:]
    with pytest.raises(DataError, match="at least 2 parquet files"):
        split_files(files[:1])


def test_empty_or_missing_dir_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match=r"no \.parquet files in .*python -m nanochat.dataset -n 8.*--data-dir"):
        list_parquet_files(str(tmp_path))
    with pytest.raises(DataError, match="does not exist.*NANOCHAT_DATA_DIR"):
        list_parquet_files(str(tmp_path / "nope"))


def test_rank_shards_disjoint_and_covering(corpus_dir):
    files = list_parquet_files(corpus_dir)
    everything = list_row_groups(files)
    all_docs = list(iter_documents(files))
    for world_size in (2, 3):
        shares = [rank_row_groups(files, r, world_size) for r in range(world_size)]
        assert all(shares)
        assert sorted(rg for share in shares for rg in share) == sorted(everything)  # cover, no repeats
        assert len(set().union(*map(set, shares))) == len(everything)                # disjoint
        docs = [d for r in range(world_size) for d in iter_documents(files, r, world_size)]
        assert sorted(docs) == sorted(all_docs)
    with pytest.raises(DataError, match="cannot be shared by"):
        rank_row_groups(files[:1], 0, len(everything) + 1)


def test_truncated_and_corrupt_files_are_named(tmp_path, write_parquet):
    good = write_parquet(tmp_path / "good.parquet", [f"document {i}" for i in range(20)])
    data = open(good, "rb").read()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated\.parquet is not a readable parquet file.*re-download"):
        list_row_groups([good, str(tmp_path / "truncated.parquet")])
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(DataError, match=r"garbage\.parquet is not a readable parquet file"):
        read_row_group(str(tmp_path / "garbage.parquet"), 0)


def test_missing_text_column(tmp_path, write_parquet):
    path = write_parquet(tmp_path / "a.parquet", ["x"], column="content")
    with pytest.raises(DataError, match=r"a\.parquet has no `text` column \(columns: content\)"):
        list_row_groups([path])


def test_non_utf8_text_is_refused(tmp_path, write_parquet):
    path = write_parquet(tmp_path / "bin.parquet", [b"fine", b"bad \xff\xfe"], type=pa.binary())
    with pytest.raises(DataError, match=r"bin\.parquet: row group 0, row 1 is not UTF-8"):
        read_row_group(path, 0)
    # parquet does not enforce UTF-8 in string columns either: build one with raw bytes
    offsets = pa.py_buffer(pa.array([0, 4, 8], type=pa.int32()).buffers()[1])
    bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"okayba\xffd")])
    path = str(tmp_path / "str.parquet")
    pa.parquet.write_table(pa.table({"text": bad}), path)
    with pytest.raises(DataError, match=r"str\.parquet: row group 0 holds text that is not UTF-8"):
        read_row_group(path, 0)
    assert read_row_group(write_parquet(tmp_path / "ok.parquet", ["naïve", "東京"], type=pa.binary()), 0) == ["naïve", "東京"]


def test_null_text_is_refused(tmp_path, write_parquet):
    path = write_parquet(tmp_path / "nulls.parquet", ["a", None, "b"])
    with pytest.raises(DataError, match=r"nulls\.parquet: row group 0 has 1 null"):
        read_row_group(path, 0)


def test_download_offline_fails_fast_and_clearly(tmp_path):
    """No network needed: offline mode, and a hub endpoint that refuses connections, both give a short clear error."""
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}):
        result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "2", "--data-dir", str(tmp_path)],
                                cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert "cannot reach the Hugging Face Hub" in result.stderr and "--data-dir" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".parquet")]


def test_download_checks_integrity_and_renames_atomically(tmp_path, monkeypatch, write_parquet):
    """A truncated download is retried and never appears as a *.parquet; a good one lands complete."""
    source = write_parquet(tmp_path / "source.parquet", [f"doc {i}" for i in range(10)])
    payload = open(source, "rb").read()
    data_dir = tmp_path / "data"
    attempts = []

    def fake_hf_hub_download(repo_id, filename, repo_type, local_dir):
        attempts.append(filename)
        os.makedirs(local_dir, exist_ok=True)
        staged = os.path.join(local_dir, filename)
        with open(staged, "wb") as f:  # first attempt: a truncated transfer
            f.write(payload if len(attempts) > 1 else payload[:100])
        return staged

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(dataset.time, "sleep", lambda s: None)
    os.makedirs(data_dir)
    with pytest.raises(DataError, match="failed 1 times"):
        dataset.download_shard(3, str(data_dir), max_attempts=1)
    assert not [n for n in os.listdir(data_dir) if n.endswith(".parquet")]
    attempts.clear()
    path = dataset.download_shard(3, str(data_dir), max_attempts=3)
    assert os.path.basename(path) == "shard_00003.parquet" and len(attempts) == 2
    assert read_row_group(path, 0)[0] == "doc 0"


class FakeHub:
    """A local stand-in for the Hub's file endpoint: HEAD metadata, GET with Range, and a first GET of
    each file that drops the connection halfway (what a flaky network does to a 100 MB shard)."""

    def __init__(self, payload, missing=()):
        import http.server
        import threading
        hub = self
        self.payload, self.missing, self.requests = payload, set(missing), []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _head(self, status, length, extra=()):
                self.send_response(status)
                for key, value in [("ETag", '"fake-etag"'), ("X-Repo-Commit", "0" * 40), ("Content-Length", str(length)),
                                   *extra]:
                    self.send_header(key, value)
                self.end_headers()

            def do_HEAD(self):
                name = self.path.rsplit("/", 1)[-1]
                hub.requests.append(("HEAD", name, None))
                if name in hub.missing:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._head(200, len(hub.payload))

            def do_GET(self):
                name, byte_range = self.path.rsplit("/", 1)[-1], self.headers.get("Range")
                hub.requests.append(("GET", name, byte_range))
                if byte_range:
                    start = int(byte_range.split("=")[1].split("-")[0])
                    body = hub.payload[start:]
                    self._head(206, len(body), [("Content-Range", f"bytes {start}-{len(hub.payload) - 1}/{len(hub.payload)}")])
                    self.wfile.write(body)
                    return
                self._head(200, len(hub.payload))
                self.wfile.write(hub.payload[:len(hub.payload) // 2])  # ...and hang up mid-body
                self.wfile.flush()
                self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def download(self, data_dir, num_shards, chunk_bytes=1024):
        # huggingface_hub writes (and resumes from) whole chunks of 10 MiB; small chunks let a small file show it
        code = (f"import huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = {chunk_bytes}; import sys; "
                f"sys.argv = ['nanochat.dataset', '-n', '{num_shards}', '--data-dir', {str(data_dir)!r}]; "
                "from nanochat.dataset import main; main()")
        env = {**os.environ, "HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=120)


def test_download_resumes_a_dropped_transfer_end_to_end(tmp_path, write_parquet):
    """`python -m nanochat.dataset` against a local fake Hub: both shards (train 0 and validation) are cut
    off halfway, resumed with a Range request from where they stopped, checked, and renamed into place."""
    source = write_parquet(tmp_path / "source.parquet", [f"document {i} " * 50 for i in range(200)])
    hub = FakeHub(open(source, "rb").read())
    try:
        result = hub.download(tmp_path / "data", 1)
    finally:
        hub.server.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("shard_00000.parquet", "shard_06542.parquet"):
        gets = [r for method, n, r in hub.requests if method == "GET" and n == name]
        assert len(gets) == 2 and gets[0] is None, gets
        resumed_at = int(gets[1].removeprefix("bytes=").removesuffix("-"))
        assert len(hub.payload) // 2 - 1024 < resumed_at <= len(hub.payload) // 2  # resumed, not restarted
        assert open(tmp_path / "data" / name, "rb").read() == hub.payload
    assert sorted(os.listdir(tmp_path / "data")) == ["shard_00000.parquet", "shard_06542.parquet"]  # staging gone


def test_download_of_a_missing_shard_fails_at_once(tmp_path):
    hub = FakeHub(b"unused", missing={"shard_00000.parquet"})
    try:
        result = hub.download(tmp_path / "data", 1)
    finally:
        hub.server.shutdown()
    assert result.returncode != 0 and "has no shard_00000.parquet" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert sum(1 for method, name, _ in hub.requests if name == "shard_00000.parquet") <= 2  # no 5x retry with backoff
