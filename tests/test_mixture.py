"""Data mixtures (--data): spec parsing, token shares, exact resume at 1 and 2 ranks with a `datasets`
stream, per-source val bpb in the JSONL, compare_runs' refusal, clear errors, clean exit codes."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a torchrun worker script, not only under pytest
    sys.path.insert(0, REPO_ROOT)

from nanochat.dataloader import DataLoader  # noqa: E402
from nanochat.dataset import DataError  # noqa: E402
from loader_helpers import assert_same_batches, check_two_rank_resume, run_two_rank_resume, take_batches  # noqa: E402
from nanochat.mixture import (check_sources, iter_mixture_texts, most_behind_source, parse_data_spec,  # noqa: E402
                              resolve_sources)

VAL_DOCS = 20  # the jsonl source's validation slice in these tests
WORDS = ["whale", "ship", "sea", "Ahab", "the", "of", "and", "harpoon", "storm", "deck"]


def write_jsonl(path, n_docs, column="content", seed=0):
    """n_docs documents tagged JSONDOC<i>, of varied length, in a `column` field (plus a distractor field)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 10, 40, 120])))
            f.write(json.dumps({"id": i, column: f"JSONDOC{i}x {words}"}) + "\n")
    return str(path)


def split_corpus(corpus_dir, root):
    """The corpus' 8 shards as two parquet sources of 4 files each (symlinks; the last file of each = val)."""
    shards = sorted(f for f in os.listdir(corpus_dir) if f.endswith(".parquet"))
    assert len(shards) >= 4, "the test corpus needs at least 4 shards"
    half = len(shards) // 2
    dirs = []
    for name, part in (("alpha", shards[:half]), ("beta", shards[half:])):
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for shard in part:
            if not os.path.exists(os.path.join(d, shard)):
                os.symlink(os.path.join(corpus_dir, shard), os.path.join(d, shard))
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def halves(corpus_dir, tmp_path_factory):
    return split_corpus(corpus_dir, str(tmp_path_factory.mktemp("halves")))


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("jsonl") / "notes.jsonl", 400)


# -----------------------------------------------------------------------------
# the spec

def test_spec_syntax(halves, jsonl, tmp_path, monkeypatch):
    alpha, beta = halves
    a, b = parse_data_spec(f"{alpha}:0.7,{beta}:0.3")
    assert (a.name, a.kind, a.location, a.weight) == ("alpha", "parquet_dir", alpha, 0.7)
    assert (b.name, b.weight, b.text_column) == ("beta", 0.3, "text")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", alpha)
    (climb,) = parse_data_spec("climbmix")
    assert (climb.name, climb.kind, climb.location, climb.weight) == ("climbmix", "parquet_dir", alpha, 1.0)
    hub, plain = parse_data_spec("hf:HuggingFaceFW/fineweb-edu/sample-10BT:2,hf:owner/name")
    assert (hub.kind, hub.location, hub.config, hub.hub_split, hub.weight, hub.builder) == \
        ("datasets", "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", 2.0, None)
    assert (plain.location, plain.config, plain.weight, plain.name) == ("owner/name", None, 1.0, "name")
    (notes,) = parse_data_spec(f"{jsonl}@content:0.5", text_column="body")
    assert (notes.name, notes.builder, notes.text_column, notes.weight) == ("notes", "json", "content", 0.5)
    assert parse_data_spec(jsonl, text_column="body")[0].text_column == "body"  # --text-column for the rest
    (many,) = parse_data_spec(os.path.join(os.path.dirname(jsonl), "*.jsonl@content"))  # a glob: named by its dir
    assert (many.name, many.builder) == (os.path.basename(os.path.dirname(jsonl)), "json")
    # a path holding ':' -- the weight is the part after the LAST colon
    colon_dir = tmp_path / "run:3"
    colon_dir.mkdir()
    (odd,) = parse_data_spec(f"{colon_dir}:1")
    assert (odd.location, odd.weight) == (str(colon_dir), 1.0)
    with pytest.raises(DataError, match="unknown source"):  # read as tmp/run at weight 3
        parse_data_spec(str(colon_dir))
    assert [s.name for s in parse_data_spec(f"{alpha}:1,{alpha}:2")] == ["alpha", "alpha-2"]


@pytest.mark.parametrize("spec, message", [
    ("nowhere:1", "unknown source 'nowhere'"),
    ("{alpha}:0", "must be a number > 0"),
    ("{alpha}:-0.5", "must be a number > 0"),
    ("{alpha}:x", "weight 'x' is not a number"),
    ("{alpha}:1,", "empty item"),
    ("/no/such/dir/*.jsonl:1", "no file matches"),
    ("hf:justaname", "hf:OWNER/NAME"),
])
def test_bad_specs_say_what_to_do(halves, spec, message):
    with pytest.raises(DataError, match=message):
        parse_data_spec(spec.format(alpha=halves[0]))


def test_data_and_data_dir_together_are_refused(halves):
    with pytest.raises(DataError, match="not both"):
        resolve_sources(f"{halves[0]}:1", halves[1])
    (only,) = resolve_sources("", halves[1])  # --data-dir alone: a one-source spec
    assert (only.kind, only.location, only.weight) == ("parquet_dir", halves[1], 1.0)


def test_missing_text_column_fails_before_reading(halves, jsonl):
    with pytest.raises(DataError, match="no `body` column"):
        check_sources(parse_data_spec(f"{halves[0]}@body:1"))
    with pytest.raises(DataError, match=r"has no `text` column \(columns: id, content\)"):
        check_sources(parse_data_spec(jsonl))
    check_sources(parse_data_spec(f"{halves[0]}:1,{jsonl}@content:1", val_documents=VAL_DOCS))


def test_preflight_checks_every_source(tokenizer, halves, jsonl, tmp_path):
    from scripts import preflight
    big = write_jsonl(tmp_path / "big.jsonl", 1100)  # more than the default 1000-document validation slice
    rows = preflight.check_data("", tokenizer, 10**5, f"{halves[0]}:1,{big}@content:1")
    assert [(r.check, r.status) for r in rows] == [("data alpha", "PASS"), ("data big", "PASS")]
    rows = preflight.check_data("", tokenizer, 10**5, f"{halves[0]}:1,{jsonl}@content:1")  # 400 documents
    assert rows[1].status == "FAIL" and "only 400 documents" in rows[1].message


def test_hub_source_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        check_sources(parse_data_spec("hf:HuggingFaceFW/fineweb-edu"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # no network here (or a name that does not exist): one DataError either way, no 23 s retry loop
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub|no such dataset"):
        check_sources(parse_data_spec("hf:nanochat-tests/no-such-dataset-4f2a"))


def test_most_behind_source_keeps_every_share_within_one_row():
    shares, packed, row = [0.5, 0.3, 0.2], [0, 0, 0], 257
    for n in range(1, 400):
        packed[most_behind_source(packed, shares)] += row
        assert all(abs(p - s * n * row) <= row for p, s in zip(packed, shares))


# -----------------------------------------------------------------------------
# the loader on a mixture

def test_token_shares_within_one_percent_over_200_batches(tokenizer, halves, jsonl):
    """A parquet dir (pyarrow) and a jsonl file (`datasets`) at 0.7 / 0.3: shares of packed tokens, rows BOS-aligned."""
    sources = parse_data_spec(f"{halves[0]}:0.7,{jsonl}@content:0.3", val_documents=VAL_DOCS)
    B, T = 4, 64
    totals = {"alpha": 0, "notes": 0}
    jsonl_rows = 0
    with DataLoader(tokenizer, B, T, data=sources, buffer_size=32) as loader:
        for _ in range(200):
            x, y = next(loader)
            rows = torch.cat([x, y[:, -1:]], dim=1)
            assert (rows[:, 0] == tokenizer.bos_token_id).all()
            for name, n in loader.last_stats["source_packed_tokens"].items():
                totals[name] += n
            assert 0 <= loader.last_stats["crop_fraction"] <= 1
            jsonl_rows += sum("JSONDOC" in tokenizer.decode(r) for r in rows.tolist())
    total = sum(totals.values())
    assert total == 200 * B * (T + 1)
    print(f"token shares over 200 batches: alpha {totals['alpha'] / total:.4f}, notes {totals['notes'] / total:.4f}")
    assert abs(totals["alpha"] / total - 0.7) < 0.01 and abs(totals["notes"] / total - 0.3) < 0.01
    assert jsonl_rows == totals["notes"] // (T + 1)  # a row comes whole from one source


@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_resume_of_a_mixture_with_a_stream(tokenizer, halves, jsonl, world_size):
    """N batches, save, resume in a fresh loader, M more == N + M straight, per rank (prefetch thread running ahead)."""
    sources = parse_data_spec(f"{halves[0]}:0.5,{jsonl}@content:0.3,{halves[1]}:0.2", val_documents=VAL_DOCS)
    kwargs = dict(data=sources, world_size=world_size, buffer_size=12, prefetch_batches=3)
    n, m = 9, 8
    firsts = []
    for rank in range(world_size):
        with DataLoader(tokenizer, 4, 48, rank=rank, **kwargs) as loader:
            reference = take_batches(loader, n + m)
        with DataLoader(tokenizer, 4, 48, rank=rank, **kwargs) as loader:
            first = take_batches(loader, n)
            state = json.loads(json.dumps(loader.state_dict()))
        assert state["position"][1][1] > 0 and state["buffer"][1]  # the stream was read and has buffered documents
        with DataLoader(tokenizer, 4, 48, rank=rank, **kwargs) as resumed:
            resumed.load_state_dict(state)
            rest = take_batches(resumed, m)
        assert_same_batches(first + rest, reference)
        firsts.append(reference[0][0])
    if world_size == 2:
        assert not torch.equal(firsts[0], firsts[1]), "ranks must read different data"


def test_a_small_stream_caps_its_buffer_at_one_epoch_and_resumes_exactly(tokenizer, jsonl):
    """380 training documents, buffer_size 1000: once the stream has wrapped, the buffer holds at most one epoch."""
    sources = parse_data_spec(f"{jsonl}@content", val_documents=VAL_DOCS)
    kwargs = dict(data=sources, buffer_size=1000, prefetch_batches=2)
    with DataLoader(tokenizer, 4, 64, **kwargs) as loader:
        reference = take_batches(loader, 30)
    with DataLoader(tokenizer, 4, 64, **kwargs) as loader:
        first = take_batches(loader, 12)
        state = json.loads(json.dumps(loader.state_dict()))
    assert state["position"][0][2] == 400 - VAL_DOCS  # the stream's length, learned at its first wrap
    assert len(state["buffer"][0]) <= 400 - VAL_DOCS
    with DataLoader(tokenizer, 4, 64, **kwargs) as resumed:
        resumed.load_state_dict(state)
        rest = take_batches(resumed, 18)
    assert_same_batches(first + rest, reference)


def test_a_state_of_another_mixture_is_refused(tokenizer, halves, jsonl):
    with DataLoader(tokenizer, 2, 32, data=f"{halves[0]}:0.7,{halves[1]}:0.3", buffer_size=4) as loader:
        next(loader)
        state = loader.state_dict()
    with DataLoader(tokenizer, 2, 32, data=f"{halves[0]}:0.5,{halves[1]}:0.5", buffer_size=4) as other:
        with pytest.raises(ValueError, match="data: saved"):
            other.load_state_dict(state)


def test_stream_validation_is_a_held_out_slice(tokenizer, jsonl):
    """Val = the first VAL_DOCS documents, each once in one_pass(); training never sees them."""
    sources = parse_data_spec(f"{jsonl}@content", val_documents=VAL_DOCS)
    with DataLoader(tokenizer, 1, 32, split="val", data=sources, packer="greedy") as loader:
        text = "".join(tokenizer.decode(torch.cat([x, y[:, -1:]], 1).flatten().tolist()) for x, y in loader.one_pass())
    seen = [text.count(f"JSONDOC{i}x") for i in range(VAL_DOCS)]
    assert max(seen) == 1 and sum(seen) >= VAL_DOCS - 2 and f"JSONDOC{VAL_DOCS}x" not in text
    train = ""
    with DataLoader(tokenizer, 4, 64, data=sources, buffer_size=16) as loader:
        for _ in range(400):  # until it wraps around the stream
            x, y = next(loader)
            train += tokenizer.decode(torch.cat([x, y[:, -1:]], 1).flatten().tolist())
            if loader.last_stats["epoch"] >= 1:
                break
    assert loader.last_stats["epoch"] == 1
    assert not any(f"JSONDOC{i}x" in train for i in range(VAL_DOCS)) and f"JSONDOC{VAL_DOCS}x" in train


def test_tokenizer_texts_follow_the_weights_by_characters(halves, jsonl):
    sources = parse_data_spec(f"{halves[0]}:0.25,{jsonl}@content:0.75", val_documents=VAL_DOCS)
    chars = {"json": 0, "parquet": 0}
    texts = iter_mixture_texts(sources, doc_cap=200)
    for _, text in zip(range(300), texts):
        chars["json" if text.startswith("JSONDOC") else "parquet"] += len(text)
    texts.close()
    share = chars["json"] / sum(chars.values())
    assert abs(share - 0.75) < 0.05, chars


def test_partly_read_stream_exits_cleanly(tokenizer_dir, jsonl, tmp_path):
    """NOTES: a half-consumed `datasets` iterator can abort the interpreter at exit (134). One loader closed, one
    left open with its prefetch thread mid-stream: the process still exits 0."""
    script = tmp_path / "partial.py"
    script.write_text(
        "from nanochat.dataloader import DataLoader\n"
        "from nanochat.tokenizer import Tokenizer\n"
        f"tokenizer = Tokenizer.load({tokenizer_dir!r})\n"
        f"closed, left_open = (DataLoader(tokenizer, 2, 32, data={jsonl + '@content'!r}, val_documents=5) for _ in '12')\n"
        "for _ in range(3): next(closed), next(left_open)\n"
        "closed.close()\n"
        "print('done')\n")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "done" in result.stdout, (result.returncode, result.stderr[-2000:])


# -----------------------------------------------------------------------------
# base_train on a mixture, and compare_runs

def run_base_train(args, base_dir, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_DTYPE")}
    env.update({"NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "2", "PYTHONPATH": REPO_ROOT})
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_base_train_logs_val_bpb_per_source(tmp_path, tokenizer_dir, halves):
    run_dir = tmp_path / "run"
    run_base_train(["--depth", "1", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "2",
                    "--total-batch-size", "128", "--num-iterations", "2", "--compile", "0", "--eval-every", "-1",
                    "--eval-tokens", "256", "--core-metric-every", "0", "--sample-every", "0", "--save-every", "0",
                    "--tokenizer-dir", tokenizer_dir, "--data", f"{halves[0]}:0.7,{halves[1]}:0.3",
                    "--run-dir", str(run_dir)], tmp_path)
    evals = [json.loads(line) for line in open(run_dir / "log.jsonl") if "val/bpb" in line]
    final = evals[-1]
    assert {"val/bpb", "val/bpb/alpha", "val/bpb/beta"} <= set(final)
    assert final["val/bpb/alpha"] != final["val/bpb/beta"]
    assert final["val/bpb"] == pytest.approx(0.7 * final["val/bpb/alpha"] + 0.3 * final["val/bpb/beta"])
    signature = json.load(open(run_dir / "run.json"))["data_signature"]
    assert signature["data"] == ["alpha=parquet_dir:alpha@text:0.7", "beta=parquet_dir:beta@text:0.3"]
    assert len(signature["val_data"]) == 2


def test_base_train_refuses_a_bad_spec_in_one_line(tmp_path, tokenizer_dir, halves):
    """The column is only known by opening the data: still one line, before a model or a run dir exists.
    (The spec's syntax errors are test_bad_specs_say_what_to_do's: they are raised by the same parser.)"""
    result = run_base_train(["--data", f"{halves[0]}@body:1", "--tokenizer-dir", tokenizer_dir,
                             "--run-dir", str(tmp_path / "run")], tmp_path, check=False)
    assert result.returncode != 0 and "no `body` column" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_compare_runs_refuses_different_mixtures(tmp_path, tokenizer, halves):
    from nanochat.report import RunLog
    from scripts import base_train, compare_runs
    args = base_train.parse_args(["--max-seq-len", "64"])

    def write_run(name, spec):
        signature = base_train.data_signature(args, tokenizer, parse_data_spec(spec), 4096)
        log = RunLog(str(tmp_path / name), name, {"data_signature": signature})
        for step in range(0, 101, 10):
            log.log({"step": step, "total_training_time": step, "total_training_flops": step * 1e9,
                     "val/bpb": 2.0 - step / 1000})
        log.finish()
        return str(tmp_path / name)

    a = write_run("a", f"{halves[0]}:0.7,{halves[1]}:0.3")
    b = write_run("b", f"{halves[0]}:0.5,{halves[1]}:0.5")
    with pytest.raises(SystemExit) as refused:
        compare_runs.main([a, b, "--out", str(tmp_path / "cmp.png")])
    assert "data" in str(refused.value.code) and "val_data" not in str(refused.value.code)
    same = write_run("c", f"{halves[0]}:0.7,{halves[1]}:0.3")
    assert compare_runs.signature_mismatches([compare_runs.load_run(a), compare_runs.load_run(same)]) == []


# -----------------------------------------------------------------------------
# two ranks under torchrun

def test_distributed_mixture_resume_under_torchrun(tokenizer_dir, halves, jsonl, tmp_path):
    """Two gloo ranks on a parquet dir + a jsonl stream: all-ranks state written by rank 0, resumed exactly by both."""
    run_two_rank_resume(__file__, [tokenizer_dir, f"{halves[0]}:0.6,{jsonl}@content:0.4"], tmp_path)


def _distributed_worker(tokenizer_dir, spec, out_dir):
    from nanochat.common import cleanup_dist, init_dist
    from nanochat.tokenizer import Tokenizer
    info = init_dist("cpu")
    tokenizer = Tokenizer.load(tokenizer_dir)
    kwargs = dict(data=parse_data_spec(spec, val_documents=VAL_DOCS), rank=info.rank, world_size=info.world_size,
                  buffer_size=12)
    check_two_rank_resume(lambda: DataLoader(tokenizer, 4, 48, **kwargs), 6, 5, out_dir, info.rank)
    cleanup_dist()


if __name__ == "__main__":
    _distributed_worker(*sys.argv[1:4])
