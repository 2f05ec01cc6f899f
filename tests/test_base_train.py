"""base_train end to end on CPU: exact resume at world size 1 and 2, fp16 inf-skip agreement, GC switch, bad input."""

import gc
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from nanochat.report import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4",
        "--compile", "0", "--eval-every", "-1", "--eval-tokens", "512", "--core-metric-every", "0",
        "--sample-every", "0", "--warmup-steps", "2", "--total-batch-size", "512"]


def run(args, base_dir, nproc=1, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_DTYPE")}
    env.update({"NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1" if nproc > 1 else "2", **(env_extra or {})})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    result = subprocess.run(launcher + ["-m", "scripts.base_train", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(run_dir, "log.jsonl")) if "train/loss" in r}


@pytest.mark.parametrize("nproc,compile", [(1, 0), (2, 0), (1, 1)])
def test_resume_is_bit_identical(nproc, compile, tmp_path, tokenizer_dir, corpus_dir):
    """N steps + save + resume + M steps == N+M straight: same per-step losses, same final weights.

    Compiled: on one thread. With more, inductor's CPU embedding backward (index_put with atomic adds in a
    parallel loop) sums colliding rows in a varying order, so wte/value-embedding gradients differ by ~1e-7
    relative between two identical steps in one process, resume or not (dev/LOG.md 2026-12-02)."""
    common = TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "6",
                     "--total-batch-size", str(4 * 64 * nproc * 2), "--compile", str(compile)]  # 2 micro-steps
    env = {"OMP_NUM_THREADS": "1"} if compile else None
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(common + ["--run-dir", str(straight), "--save-every", "3"], tmp_path, nproc, env)
    # the resumed run starts from a copy of the straight run's step-3 checkpoint
    shutil.copytree(straight / "checkpoints" / "step_000003", resumed / "checkpoints" / "step_000003")
    out = run(common + ["--run-dir", str(resumed), "--save-every", "3", "--resume-from-step", "latest"], tmp_path,
              nproc, env)
    assert "resumed from" in out.stdout
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    assert a[6] < a[1]  # and it learned something
    wa = load_file(straight / "checkpoints" / "step_000006" / "model.safetensors")
    wb = load_file(resumed / "checkpoints" / "step_000006" / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_fp16_inf_on_one_rank_skips_on_both(tmp_path):
    worker = os.path.join(REPO, "tests", "dist_inf_skip_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker],
                            cwd=REPO, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("skipped=[False, True, False] equal_across_ranks=True") == 2


def test_gc_is_frozen_and_disabled_after_first_step():
    from scripts.base_train import manage_gc
    assert gc.isenabled()
    try:
        manage_gc(1)
        assert not gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_resolved_table_and_jsonl(tmp_path, tokenizer_dir, corpus_dir):
    out = run(TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "3",
                      "--run-dir", str(tmp_path / "r"), "--save-every", "0", "--eval-every", "2"], tmp_path)
    assert "resolved hyperparameters" in out.stdout and "total_batch_tokens" in out.stdout
    records = read_jsonl(tmp_path / "r" / "log.jsonl")
    keys = {"step", "train/loss", "train/lrm", "train/dt", "train/tok_per_sec", "train/mfu", "total_training_flops",
            "total_training_time", "train/crop_fraction", "train/dt_data", "train/dt_optim"}
    assert keys <= set(records[1])
    assert [r["step"] for r in records if "val/bpb" in r] == [0, 2, 3]
    info = json.load(open(tmp_path / "r" / "run.json"))
    assert info["data_signature"]["sequence_len"] == 64 and info["data_signature"]["packing"] == "greedy-one-pass"
    assert not os.path.exists(tmp_path / "r" / "checkpoints")


BAD_INPUTS = [
    (["--depth", "0"], "argument --depth: got 0, expected an integer >= 1"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--total-batch-size", "1000"], "not divisible by device-batch-size"),
    (["--fp8", "--compile", "0"], "--fp8 needs --compile 1"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_flags_fail_clearly(extra, message, tmp_path, tokenizer_dir, corpus_dir):
    out = run(TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "2",
                      "--run-dir", str(tmp_path / "r")] + extra, tmp_path, check=False)
    assert out.returncode != 0 and message in out.stderr + out.stdout


def test_missing_tokenizer_and_data_fail_clearly(tmp_path, tokenizer_dir, corpus_dir):
    out = run(TINY + ["--data-dir", corpus_dir, "--tokenizer-dir", str(tmp_path / "nope")], tmp_path, check=False)
    assert out.returncode != 0 and "scripts.tok_train" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run(TINY + ["--data-dir", str(empty), "--tokenizer-dir", tokenizer_dir], tmp_path, check=False)
    assert out.returncode != 0 and str(empty) in out.stderr and "Traceback" not in out.stderr


def test_unreachable_eval_bundle_fails_before_training(tmp_path, tokenizer_dir, corpus_dir):
    # CORE runs at the last step by default: an offline run must learn that at startup, not after training
    out = run(TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "2",
                      "--run-dir", str(tmp_path / "r"), "--core-metric-every", "-1",
                      "--eval-bundle", "http://127.0.0.1:9/eval_bundle.zip"], tmp_path, check=False)
    assert out.returncode != 0 and "could not download the CORE eval bundle" in out.stderr
    assert "--eval-bundle" in out.stderr and "Traceback" not in out.stderr and "step 00001" not in out.stdout


def test_default_eval_bundle_offline_turns_core_off(monkeypatch, capsys, tmp_path):
    from nanochat import core_eval
    from scripts.base_train import parse_args, resolve_core_bundle
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(core_eval, "DEFAULT_BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")
    assert resolve_core_bundle(parse_args(["--core-metric-every", "-1"])) is None
    assert "CORE is off for this run" in capsys.readouterr().out
    assert resolve_core_bundle(parse_args(["--core-metric-every", "0"])) is None
    assert resolve_core_bundle(parse_args(["--eval-bundle", core_eval.MINI_BUNDLE_DIR])).endswith("eval_bundle_mini")


def test_bad_checkpoints_fail_clearly_and_keep_the_good_one(tmp_path, tokenizer_dir, corpus_dir):
    common = TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--run-dir", str(tmp_path / "r")]
    run(common + ["--num-iterations", "2"], tmp_path)
    good = tmp_path / "r" / "checkpoints" / "step_000002"
    before = {name: (good / name).read_bytes() for name in os.listdir(good)}
    # another shape
    out = run(common + ["--num-iterations", "4", "--depth", "3", "--resume-from-step", "2"], tmp_path, check=False)
    assert out.returncode != 0 and "--depth" in out.stderr and "Traceback" not in out.stderr
    # another batch shape: the loader cannot resume exactly, and says which flag differs
    out = run(common + ["--num-iterations", "4", "--device-batch-size", "2", "--resume-from-step", "2"], tmp_path, check=False)
    assert out.returncode != 0 and "batch_size: saved 4, now 2" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # a truncated checkpoint
    broken = tmp_path / "r" / "checkpoints" / "step_000003"
    shutil.copytree(good, broken)
    (broken / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    out = run(common + ["--num-iterations", "4", "--resume-from-step", "3"], tmp_path, check=False)
    assert out.returncode != 0 and "truncated" in out.stderr and "Traceback" not in out.stderr
    assert {name: (good / name).read_bytes() for name in os.listdir(good)} == before


def test_warm_up_changes_nothing():
    """The warm-up (incl. an optimizer step at lr 0) leaves parameters and optimizer state bit-identical."""
    import torch
    from nanochat.loss_scale import DynamicLossScaler
    from scripts import base_train
    args = base_train.parse_args(TINY + ["--num-iterations", "2"])
    model = base_train.build_model(args, 256, torch.device("cpu"))
    hp = base_train.resolve_hyperparameters(args, model, 1)
    optimizer = base_train.build_optimizer(model, hp, args)
    scaler = DynamicLossScaler(enabled=False)
    batches = iter(lambda: (torch.randint(0, 256, (4, 64)),) * 2, None)
    base_train.train_step(model, model, optimizer, scaler, batches, 1)  # non-trivial optimizer state
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    base_train.warm_up(model, model, optimizer, args, torch.device("cpu"), scaler)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(v, after[i][k]) for i, s in state.items() for k, v in s.items())
    assert all(g["lr"].item() == pytest.approx(g["initial_lr"]) for g in optimizer.param_groups)


def test_training_draws_no_random_numbers(tokenizer, corpus_dir):
    """Why checkpoints hold no RNG state: the warm-up, a training step (data, forward, backward, optimizer) and a
    val evaluation leave torch's global generator untouched, so an exact resume needs none. Whoever adds
    something random (dropout, sampled data) makes this fail and must then save and restore the state."""
    import torch
    from nanochat.dataloader import DataLoader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.loss_scale import DynamicLossScaler
    from scripts import base_train
    cpu = torch.device("cpu")
    args = base_train.parse_args(TINY + ["--num-iterations", "2"])
    model = base_train.build_model(args, tokenizer.vocab_size, cpu)
    optimizer = base_train.build_optimizer(model, base_train.resolve_hyperparameters(args, model, 1), args)
    scaler = DynamicLossScaler(enabled=True)  # the fp16 path: scaling and the inf check included
    with DataLoader(tokenizer, 4, 64, split="train", data_dir=corpus_dir, buffer_size=64) as loader:
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        base_train.warm_up(model, model, optimizer, args, cpu, scaler)
        for _ in range(2):
            base_train.train_step(model, model, optimizer, scaler, loader, 2)
        with torch.no_grad(), DataLoader(tokenizer, 4, 64, split="val", data_dir=corpus_dir,
                                         packer=base_train.VAL_PACKER) as val:
            evaluate_bpb(model, val.one_pass(), 2, tokenizer.token_bytes())
        assert torch.equal(torch.get_rng_state(), state)


def test_data_signature_follows_the_val_loader(monkeypatch, tmp_path, tokenizer_dir, corpus_dir):
    """The signature's packing is what the val evaluation really does: base_train.main is run with a DataLoader
    that records how it is built and read; changing VAL_PACKER changes both the evaluation and the signature."""
    from nanochat.dataloader import DataLoader
    from scripts import base_train

    class RecordingLoader(DataLoader):
        made = []

        def __init__(self, *args, split="train", packer="best_fit", **kwargs):
            super().__init__(*args, split=split, packer=packer, **kwargs)
            self.split, self.packer, self.read_one_pass = split, packer, False
            RecordingLoader.made.append(self)

        def one_pass(self):
            self.read_one_pass = True
            return super().one_pass()

    monkeypatch.setattr(base_train, "DataLoader", RecordingLoader)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    signatures = {}
    for packer in ("greedy", "best_fit"):
        monkeypatch.setattr(base_train, "VAL_PACKER", packer)
        RecordingLoader.made.clear()
        run_dir = tmp_path / packer
        try:
            base_train.main(TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "1",
                                    "--save-every", "0", "--run-dir", str(run_dir), "--device-type", "cpu"])
        finally:
            gc.unfreeze()  # main froze and disabled the GC after its first step
            gc.enable()
        val, = [loader for loader in RecordingLoader.made if loader.split == "val"]
        assert val.packer == packer and val.read_one_pass
        signatures[packer] = json.load(open(run_dir / "run.json"))["data_signature"]["packing"]
    assert signatures == {"greedy": "greedy-one-pass", "best_fit": "best_fit-one-pass"}


def test_dry_run_prints_the_d24_record_table(tmp_path):
    """--dry-run 8 at the speedrun's flags: RECIPE's d24 numbers, from a meta-device model, no tokenizer or data."""
    out = run(["--depth", "24", "--target-param-data-ratio", "8", "--device-batch-size", "16", "--dry-run", "8"],
              tmp_path / "empty_base")
    assert "no tokenizer found" in out.stdout
    table = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.startswith("  "))
    assert table["params_scaling"] == "729,810,624" and table["total_batch_tokens"] == "1,048,576"
    assert table["num_iterations"] == "5568" and table["grad_accum_steps"] == "4"
    assert table["matrix_lr"] == "0.02828" and table["muon_lr_6144x1536"] == "0.05657"
    assert table["weight_decay"] == "0.05974" and table["gate_lr"] == "0.2"
    assert table["wte_lr_effective"] == "0.3" and table["lm_head_lr_effective"] == "0.008"
    assert table["warmup_steps"] == "40"  # the record's warmup (issue 26: the GPU command runs the record's settings)
    assert not (tmp_path / "empty_base").exists() or not any((tmp_path / "empty_base").iterdir())
