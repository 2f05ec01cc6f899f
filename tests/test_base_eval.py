"""scripts/base_eval.py end to end on a tiny checkpoint whose every number is known in advance.

The checkpoint's lm_head is zero, so the model predicts the uniform distribution over its vocabulary V
whatever the input: every scored token costs log2(V) bits, so bits per byte = log2(V) x tokens / bytes of
the evaluated targets; every CORE candidate ties, so multiple-choice and schema accuracies are exactly the
random baselines (centered 0) and CORE is ~0. A checkpoint not loaded (a fresh init) breaks the ties.
"""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from eval_helpers import write_test_bundle
from nanochat.checkpoint import save_checkpoint
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, GPTConfig
from scripts.base_train import VAL_PACKER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, B, BPB_TOKENS, STEP = 64, 2, 2048, 5


def uniform_bpb(tokenizer, corpus_dir, split, steps):
    """log2(V) bits for every target that stands for bytes, over the batches base_eval reads."""
    token_bytes = tokenizer.token_bytes()
    n_tokens = n_bytes = 0
    with DataLoader(tokenizer, B, T, split=split, data_dir=corpus_dir, packer=VAL_PACKER) as batches:
        for _, (_, targets) in zip(range(steps), batches.one_pass()):
            nbytes = token_bytes[targets]
            n_tokens += int((nbytes > 0).sum())
            n_bytes += int(nbytes.sum())
    return math.log2(tokenizer.vocab_size) * n_tokens / n_bytes


def test_base_eval_end_to_end(tmp_path, tokenizer, tokenizer_dir, corpus_dir):
    config = GPTConfig.from_depth(1, vocab_size=tokenizer.vocab_size, sequence_len=T, head_dim=32)
    model = GPT.build(config, torch.device("cpu"), seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    run_dir = tmp_path / "run"
    save_checkpoint(str(run_dir / "checkpoints"), STEP, model, {}, {"model_config": config.to_dict(), "args": {}})
    bundle = write_test_bundle(tmp_path / "bundle")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="2", NANOCHAT_BASE_DIR=str(tmp_path / "base"), WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "scripts.base_eval", "--run-dir", str(run_dir), "--tokenizer-dir", tokenizer_dir,
           "--data-dir", corpus_dir, "--eval-bundle", bundle, "--bpb-tokens", str(BPB_TOKENS), "--device-batch-size",
           str(B), "--num-sample-tokens", "4", "--device-type", "cpu"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    csv_path = run_dir / f"base_eval_step{STEP:06d}.csv"
    assert f"evaluating {run_dir} step {STEP}" in proc.stdout and f"wrote {csv_path}" in proc.stdout
    with open(csv_path, newline="") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["train_bpb", "val_bpb", "arith_mc", "who_schema", "facts_lm", "core_metric"]
    value = {metric: float(row["value"]) for metric, row in rows.items()}
    steps = BPB_TOKENS // (B * T)
    for split in ("train", "val"):
        assert value[f"{split}_bpb"] == pytest.approx(uniform_bpb(tokenizer, corpus_dir, split, steps), rel=1e-6)
    assert value["train_bpb"] != value["val_bpb"]  # two splits really read
    # every candidate ties: the expected credit is exactly the random baseline (25%, 50%), centered 0
    assert value["arith_mc"] == pytest.approx(0.25, abs=1e-12) and float(rows["arith_mc"]["centered"]) == pytest.approx(0, abs=1e-12)
    assert value["who_schema"] == pytest.approx(0.5, abs=1e-12) and float(rows["who_schema"]["centered"]) == pytest.approx(0, abs=1e-12)
    assert 0 < value["facts_lm"] <= 1 / tokenizer.vocab_size  # greedy reproduces an n-token answer with probability V^-n
    assert value["core_metric"] == pytest.approx(sum(float(rows[t]["centered"]) for t in ("arith_mc", "who_schema", "facts_lm")) / 3)
    assert 0 < value["core_metric"] <= 1 / tokenizer.vocab_size
    assert proc.stdout.count("sample: ") == 5


def write_run(runs_root, name, depth, created, tokenizer, step=STEP):
    """A run dir as base_train leaves it: run.json (RunLog's keys) and one checkpoint of a depth-`depth` model."""
    config = GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, sequence_len=T, head_dim=32)
    run_dir = runs_root / name
    save_checkpoint(str(run_dir / "checkpoints"), step, GPT.build(config, torch.device("cpu"), seed=0), {},
                    {"model_config": config.to_dict(), "args": {}})
    (run_dir / "run.json").write_text(json.dumps({"run": name, "created": created, "model_config": config.to_dict()}))
    return str(run_dir)


def test_finds_the_run_by_name_or_the_latest(tmp_path, monkeypatch, capsys, tokenizer_dir, tokenizer, corpus_dir):
    """No --run: the newest run (of --depth, if given); --run NAME: base_train's run of that name, wherever it sorts."""
    from scripts.base_eval import main
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    runs = tmp_path / "base" / "runs"
    named = write_run(runs, "my-run", depth=2, created=1000.0, tokenizer=tokenizer, step=3)
    latest = write_run(runs, "d1-20261202-010203", depth=1, created=2000.0, tokenizer=tokenizer, step=7)
    common = ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--skip-core", "--num-sample-tokens", "0",
              "--bpb-tokens", str(B * T), "--device-batch-size", str(B), "--device-type", "cpu"]
    for argv, run_dir, step in ((["--run", "my-run"], named, 3), ([], latest, 7), (["--depth", "2"], named, 3),
                                (["--run-dir", named], named, 3)):
        main(argv + common)
        out = capsys.readouterr().out
        assert f"evaluating {run_dir} step {step} " in out, (argv, out)
        assert os.path.exists(os.path.join(run_dir, f"base_eval_step{step:06d}.csv"))


def test_an_unknown_run_is_one_line_naming_the_runs_there(tmp_path, monkeypatch):
    from nanochat.runs import RunDirError
    from scripts.base_eval import find_run_dir, parse_args
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    os.makedirs(tmp_path / "runs" / "baseline")
    (tmp_path / "runs" / "baseline" / "run.json").write_text(json.dumps({"created": 1.0, "model_config": {"n_layer": 4}}))
    with pytest.raises(RunDirError, match=r"no run 'nope'.*baseline"):
        find_run_dir(parse_args(["--run", "nope"]))
    with pytest.raises(RunDirError, match="no run of depth 12"):
        find_run_dir(parse_args(["--depth", "12"]))
