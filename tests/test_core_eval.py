"""CORE: bundle parsing, few-shot sampling, prompt rendering, truncation, scoring, oracle/uniform
models, the real GPT end to end, world size 1 vs 2, and safe download/extraction of the bundle."""

import functools
import http.server
import json
import math
import os
import socket
import stat
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
import torch.nn.functional as F

from dist_eval_worker import evaluate_all
from eval_helpers import (MC_ITEMS, ByteTokenizer, OracleModel, UniformModel, gold_sequences, tiny_gpt,
                          write_test_bundle)
from nanochat.common import init_dist
from nanochat.core_eval import (MINI_BUNDLE_DIR, SHUFFLE_SEED, BundleError, evaluate_core, evaluate_task, fewshot_indices, get_eval_bundle,
                                item_credit, load_items, load_tasks, render_item, safe_extract, score_sequences,
                                tokenize_pairs)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
CPU = torch.device("cpu")


@pytest.fixture
def bundle(tmp_path):
    return write_test_bundle(tmp_path / "bundle")


def task_of(kind, shots, delim=" "):
    return {"label": kind, "icl_task_type": kind, "num_fewshot": shots, "continuation_delimiter": delim}


# -----------------------------------------------------------------------------
# bundle parsing

def test_load_tasks_reads_yaml_and_baselines(bundle):
    tasks = {t["label"]: t for t in load_tasks(bundle)}
    assert [t["icl_task_type"] for t in tasks.values()] == ["multiple_choice", "schema", "language_modeling"]
    assert {k: t["num_fewshot"] for k, t in tasks.items()} == {"arith_mc": 3, "who_schema": 2, "facts_lm": 2}
    assert {k: t["baseline_acc"] for k, t in tasks.items()} == {"arith_mc": 0.25, "who_schema": 0.5, "facts_lm": 0.0}
    assert tasks["facts_lm"]["continuation_delimiter"] == "\nAnswer: "
    assert load_items(tasks["arith_mc"]) == MC_ITEMS


def test_bad_bundle_data_fails_clearly(bundle):
    task = load_tasks(bundle)[0]
    with open(task["data_path"], "a") as f:
        f.write(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(BundleError, match=r"arith_mc.jsonl:11"):
        load_items(task)
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Random baseline\narith_mc,25\n")
    with pytest.raises(BundleError, match="who_schema has no row in eval_meta_data.csv"):
        load_tasks(bundle)


def test_shipped_mini_bundle_has_every_task_type():
    tasks = load_tasks(get_eval_bundle(MINI_BUNDLE_DIR))
    assert {t["icl_task_type"] for t in tasks} == {"multiple_choice", "schema", "language_modeling"}
    assert any(t["num_fewshot"] > 0 for t in tasks)
    for task in tasks:
        assert len(load_items(task)) >= 10


# -----------------------------------------------------------------------------
# few-shot sampling and prompts

def test_fewshot_is_deterministic_distinct_and_never_the_item():
    n = 12
    for idx in range(n):
        shots = fewshot_indices(n, idx, 4)
        assert shots == fewshot_indices(n, idx, 4)
        assert idx not in shots and len(set(shots)) == 4 and all(0 <= j < n for j in shots)
        assert sorted(fewshot_indices(n, idx, n - 1)) == [j for j in range(n) if j != idx]
    assert len({tuple(fewshot_indices(n, idx, 4)) for idx in range(n)}) > 1  # not one fixed set for all


def test_render_multiple_choice():
    items = [{"query": "Q: 2+2?\nA:", "choices": ["3", "4"], "gold": 1},
             {"query": "Q: 1+1?\nA:", "choices": ["2", "5"], "gold": 0}]
    pairs, gold = render_item(task_of("multiple_choice", 1), items, 0)
    context = "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA:"
    assert pairs == [(context, " 3"), (context, " 4")] and gold == 1


def test_render_schema():
    items = [{"context_options": ["Ann fed Bo because Ann", "Ann fed Bo because Bo"], "continuation": "was hungry.",
              "gold": 1},
             {"context_options": ["Cy met Di", "Di met Cy"], "continuation": "at noon.", "gold": 0}]
    pairs, gold = render_item(task_of("schema", 1), items, 0)
    assert pairs == [("Cy met Di at noon.\n\nAnn fed Bo because Ann", " was hungry."),
                     ("Cy met Di at noon.\n\nAnn fed Bo because Bo", " was hungry.")] and gold == 1


def test_render_language_modeling_strips_context_and_moves_spaces_to_the_answer():
    items = [{"context": "Capital of France? ", "continuation": "Paris"},
             {"context": " Capital of Italy?", "continuation": "Rome"}]
    pairs, gold = render_item(task_of("language_modeling", 1, "\nAnswer: "), items, 0)
    assert pairs == [("Capital of Italy?\nAnswer: Rome\n\nCapital of France?\nAnswer:", " Paris")] and gold == 0


def test_tokenize_pairs_bos_answer_span_and_left_truncation():
    context, answer = "one two three four five six seven", " eight"
    (ids, start), = tokenize_pairs(TOK, [(context, answer)], max_seq_len=100)
    assert ids == [TOK.bos_token_id] + TOK.encode(context) + TOK.encode(answer)
    assert ids[start:] == TOK.encode(answer)
    (ids, start), = tokenize_pairs(TOK, [(context, answer)], max_seq_len=16)
    assert len(ids) == 16 and ids[0] == TOK.bos_token_id
    assert ids[start:] == TOK.encode(answer) and ids[1:start] == TOK.encode(context)[-(15 - len(answer)):]
    with pytest.raises(BundleError, match="max_seq_len=6"):
        tokenize_pairs(TOK, [(context, answer)], max_seq_len=6)


# -----------------------------------------------------------------------------
# scoring

def test_score_sequences_matches_per_sequence_reference_at_any_batching():
    model = tiny_gpt(noise=0.1)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for length, answer_len in [(40, 5), (12, 3), (64, 1), (25, 25 - 1), (7, 2)]:
        ids = [TOK.bos_token_id] + torch.randint(0, 256, (length - 1,), generator=g).tolist()
        seqs.append((ids, length - answer_len))
    for batch_tokens in (1, 100, 2**14):  # one row per forward ... everything in one forward
        mean_loss, greedy_prob = score_sequences(model, seqs, CPU, batch_tokens)
        for (ids, start), loss, prob in zip(seqs, mean_loss, greedy_prob):
            logits = model(torch.tensor([ids]))[0]
            expected = F.cross_entropy(logits[start - 1:-1], torch.tensor(ids[start:]))
            assert loss == pytest.approx(expected.item(), abs=1e-5)
            hits = (logits[start - 1:-1].argmax(-1) == torch.tensor(ids[start:])).all().item()
            assert prob == float(hits)


def test_ties_earn_their_expected_credit():
    assert item_credit("multiple_choice", [1.0, 2.0, 1.5], None, 0) == 1.0
    assert item_credit("multiple_choice", [1.0, 1.0, 2.0, 1.0], None, 3) == pytest.approx(1 / 3)
    assert item_credit("schema", [1.0, 1.0], None, 0) == 0.5
    assert item_credit("multiple_choice", [1.0, 1.0, 0.9], None, 0) == 0.0
    # language modelling: at each position k tokens share the top logit -> 1/k chance of the gold pick
    logits = torch.tensor([[[0.0, 5.0, 5.0], [9.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    _, (prob,) = score_sequences(lambda idx: logits, [([0, 1, 0, 2], 1)], CPU)
    assert prob == pytest.approx(0.5 * 1.0 * (1 / 3))


def test_oracle_scores_centered_one(bundle):
    for task in load_tasks(bundle):
        items = load_items(task)
        oracle = OracleModel(TOK.vocab_size, gold_sequences(TOK, task, items, max_seq_len=64))
        assert evaluate_task(oracle, TOK, task, items, CPU, max_seq_len=64) == 1.0, task["label"]


def test_uniform_scores_chance_so_centered_zero(bundle):
    """All logits equal: every candidate ties, so each item earns 1 / #choices in expectation, exactly the
    random baseline (25% with 4 choices, 50% with 2); greedy decoding reproduces an n-token answer with
    probability (1/V)^n, ~0 = the baseline of language modelling. CORE is then ~0."""
    out = evaluate_core(UniformModel(TOK.vocab_size), TOK, bundle, CPU, max_seq_len=64, print_fn=lambda *a: None)
    assert out["results"]["arith_mc"] == pytest.approx(0.25, abs=1e-12)
    assert out["results"]["who_schema"] == pytest.approx(0.5, abs=1e-12)
    # the shortest answer is " legs"/" blue"/... : 5 bytes, so at most (1/257)^5 per item
    assert 0 < out["results"]["facts_lm"] < 257.0 ** -5
    assert out["core_metric"] == pytest.approx(0.0, abs=1e-9)
    assert out["core_metric"] == pytest.approx(sum(out["centered"].values()) / 3)


def test_real_gpt_end_to_end_on_the_mini_bundle():
    model = tiny_gpt(sequence_len=64)
    lines = []
    out = evaluate_core(model, TOK, get_eval_bundle(MINI_BUNDLE_DIR), CPU, max_seq_len=64, print_fn=lines.append)
    labels = [t["label"] for t in load_tasks(MINI_BUNDLE_DIR)]
    assert list(out["results"]) == labels == list(out["centered"])
    assert all(0.0 <= acc <= 1.0 for acc in out["results"].values())
    assert math.isfinite(out["core_metric"])
    assert out["core_metric"] == pytest.approx(sum(out["centered"].values()) / len(labels))
    assert len(lines) == len(labels) + 1 and lines[-1].startswith("CORE metric")


def test_world_size_1_and_2_agree(bundle, tmp_path):
    # world size 2 gets the bundle as a zip: both ranks call get_eval_bundle, one extracts, both read it
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "tests", "dist_eval_worker.py"), zip_bundle(bundle, tmp_path / "eval_bundle.zip"),
           str(tmp_path / "ws2.json")]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ws2 = json.loads((tmp_path / "ws2.json").read_text())
    assert len([d for d in os.listdir(tmp_path / "base") if d.startswith("eval_bundle-")]) == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: the same kernels, so the same float rounding
    try:
        ws1 = evaluate_all(bundle, init_dist("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert (ws1.pop("world_size"), ws2.pop("world_size")) == (1, 2)
    assert ws1["oracle"] == {"arith_mc": 1.0, "who_schema": 1.0, "facts_lm": 1.0}
    assert ws2.pop("bpb") == pytest.approx(ws1.pop("bpb"), rel=1e-12)
    # ws1 saw batches[0::2] on its only rank, ws2 the same on rank 0 and none on rank 1: same number, no hang
    assert ws2.pop("bpb_rank0_batches") == pytest.approx(ws1.pop("bpb_rank0_batches"), rel=1e-12)
    assert ws1 == ws2  # CORE: identical accuracies, with and without max_per_task


def test_failed_download_fails_every_rank_instead_of_hanging(tmp_path):
    # rank 0 downloads while rank 1 waits: a failure must reach rank 1 too, not leave it at a barrier
    script = tmp_path / "fetch.py"
    script.write_text(
        "from nanochat.common import init_dist, cleanup_dist\n"
        "from nanochat.core_eval import BundleError, get_eval_bundle\n"
        "info = init_dist('cpu')\n"
        "try:\n"
        "    get_eval_bundle('http://127.0.0.1:9/eval_bundle.zip')\n"
        "except BundleError as e:\n"
        "    print(f'rank {info.rank}: BundleError: {e}', flush=True)\n"
        "cleanup_dist()\n")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: BundleError: could not download" in proc.stdout
    assert "rank 1: BundleError: the eval bundle could not be installed on another rank" in proc.stdout


# -----------------------------------------------------------------------------
# the bundle: zips, download, cache

def zip_bundle(bundle, zip_path, top="eval_bundle"):
    with zipfile.ZipFile(zip_path, "w") as zf:
        for dirpath, _, files in os.walk(bundle):
            for name in files:
                path = os.path.join(dirpath, name)
                zf.write(path, os.path.join(top, os.path.relpath(path, bundle)))
    return str(zip_path)


@pytest.mark.parametrize("member", ["../evil", "eval_bundle/../../evil", "/tmp/evil_abs", "C:/evil"])
def test_zip_with_escaping_member_is_refused(tmp_path, monkeypatch, bundle, member):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    zip_path = zip_bundle(bundle, tmp_path / "bad.zip")
    with zipfile.ZipFile(zip_path, "a") as zf:
        zf.writestr(member, "pwned")
    with pytest.raises(BundleError, match="would land outside"):
        get_eval_bundle(zip_path)
    assert not (tmp_path / "evil").exists() and not os.path.exists("/tmp/evil_abs")
    assert not [d for d in os.listdir(tmp_path / "base") if d.startswith("eval_bundle")]  # nothing installed


def test_zip_with_symlink_is_refused(tmp_path):
    zip_path = tmp_path / "link.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        info = zipfile.ZipInfo("eval_bundle/core.yaml")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(BundleError, match="symbolic link"):
        safe_extract(zip_path, tmp_path / "out")


def test_local_zip_is_extracted_once_into_the_cache(tmp_path, monkeypatch, bundle):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    zip_path = zip_bundle(bundle, tmp_path / "eval_bundle.zip")
    root = get_eval_bundle(zip_path)
    assert root.startswith(str(tmp_path / "base")) and os.path.basename(root) == "eval_bundle"
    assert [t["label"] for t in load_tasks(root)] == ["arith_mc", "who_schema", "facts_lm"]
    marker = os.path.join(root, "marker")
    open(marker, "w").close()
    assert get_eval_bundle(zip_path) == root and os.path.exists(marker)  # reused, not re-extracted
    assert not [d for d in os.listdir(tmp_path / "base") if d.startswith(".")]  # no temp dirs left
    with pytest.raises(BundleError, match="not a CORE eval bundle"):
        get_eval_bundle(str(tmp_path / "base"))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_once_then_cached_and_offline_error(tmp_path, monkeypatch, bundle):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    serve_dir = tmp_path / "www"
    serve_dir.mkdir()
    zip_bundle(bundle, serve_dir / "eval_bundle.zip")
    handler = functools.partial(QuietHandler, directory=str(serve_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
    try:
        root = get_eval_bundle(url)
    finally:
        server.shutdown()
        server.server_close()
    assert len(load_tasks(root)) == 3
    assert get_eval_bundle(url) == root  # the server is gone: this came from the cache
    with socket.socket() as s:  # a port nobody listens on: what offline looks like
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with pytest.raises(BundleError, match="--eval-bundle .*eval_bundle_mini"):
        get_eval_bundle(f"http://127.0.0.1:{dead_port}/eval_bundle.zip")


# -----------------------------------------------------------------------------
# centered accuracy and CORE, by hand

def test_centered_accuracy_and_core_by_hand(bundle):
    """A model that knows the gold answer of some items and a wrong answer of the others, so every accuracy
    is a known fraction away from the baseline; centered = (acc - b) / (1 - b) and CORE = their mean,
    computed here by hand, through evaluate_core (the path base_train and base_eval call):
        arith_mc   (4 choices, b = 25%): 7 of 10 right -> acc 0.7   -> (0.7 - 0.25) / 0.75 = 0.6
        who_schema (2 options, b = 50%): 7 of 8 right  -> acc 0.875 -> (0.875 - 0.5) / 0.5 = 0.75
        facts_lm   (b = 0%):             3 of 8 right  -> acc 0.375 -> 0.375
        CORE = (0.6 + 0.75 + 0.375) / 3 = 0.575
    (acc - b alone would give 0.45 / 0.375 / 0.375; a formula that only maps acc = b to 0 fails here.)"""
    import random
    right = {"arith_mc": 7, "who_schema": 7, "facts_lm": 3}
    sequences = []
    for task in load_tasks(bundle):
        items = load_items(task)
        known = [json.dumps(item, sort_keys=True) for item in items[:right[task["label"]]]]
        random.Random(SHUFFLE_SEED).shuffle(items)  # evaluate_core's order: the prompts' few-shot examples follow it
        for idx, item in enumerate(items):
            pairs, gold = render_item(task, items, idx)
            if json.dumps(item, sort_keys=True) in known:
                sequences += tokenize_pairs(TOK, [pairs[gold]], 64)
            elif len(pairs) > 1:  # confidently wrong: the next candidate after gold gets all the mass
                sequences += tokenize_pairs(TOK, [pairs[(gold + 1) % len(pairs)]], 64)
            # language modelling, unknown: uniform logits reproduce the answer with probability ~0
    model = OracleModel(TOK.vocab_size, sequences)
    out = evaluate_core(model, TOK, bundle, CPU, max_seq_len=64, print_fn=lambda *a: None)
    assert out["results"]["arith_mc"] == pytest.approx(0.7)
    assert out["results"]["who_schema"] == pytest.approx(0.875)
    assert out["results"]["facts_lm"] == pytest.approx(0.375, abs=1e-9)
    assert out["centered"]["arith_mc"] == pytest.approx(0.6)
    assert out["centered"]["who_schema"] == pytest.approx(0.75)
    assert out["centered"]["facts_lm"] == pytest.approx(0.375, abs=1e-9)
    assert out["core_metric"] == pytest.approx(0.575, abs=1e-9)
