"""A run that guards itself: divergence stops it before NaN reaches the weights, one writer per run dir,
unique default run dirs, spike warnings, and the resume quirks (finished run, changed horizon)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanochat.checkpoint import list_steps, load_model_weights, load_rank_state, step_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.guards import SpikeDetector, check_finite
from nanochat.report import read_jsonl
from nanochat.runs import RunDirError, RunDirLock, latest_run_dir, new_run_name, resolve_run_dir
from scripts.base_train import format_bpb, format_duration
from tests.test_base_train import REPO, TINY, losses, run

HOT_LRS = ["--matrix-lr", "1e6", "--embedding-lr", "1e6", "--unembedding-lr", "1e6"]


def one_line_error(result, needle):
    """Exit != 0, no traceback, and the error is one line on stderr containing needle."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("base_train:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-3000:]
    return lines[0]


def test_diverged_run_stops_before_nan_reaches_weights_or_checkpoints(tmp_path, tokenizer_dir, corpus_dir):
    """The issue's run (LRs 1e6) at d2: it stops within a few steps of the first NaN loss, with exit 1, one line that
    names the step, the last good checkpoint and the resume command, and every checkpoint left loads finite."""
    run_dir = tmp_path / "r"
    result = run(TINY + HOT_LRS + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "200",
                                   "--save-every", "2", "--run-dir", str(run_dir)], tmp_path, check=False)
    line = one_line_error(result, "diverged at step")
    logged = losses(run_dir)
    stop = int(line.split("diverged at step ")[1].split(":")[0])
    assert stop < 30
    if "the training loss is nan" in line or "the training loss is inf" in line:
        assert max(logged) == stop - 1  # stopped before the optimizer step: the NaN step is never trained or logged
    else:  # the loss was still finite but a weight or optimizer state was not: that checkpoint is never written
        assert "holds a NaN/inf (not saved)" in line and max(logged) == stop
        assert stop not in list_steps(str(run_dir / "checkpoints"))
    assert all(v is not None for v in logged.values())  # every logged step had a finite loss
    steps = list_steps(str(run_dir / "checkpoints"))
    assert steps and f"last good checkpoint: step {steps[-1]}" in line and "--resume-from-step " + str(steps[-1]) in line
    assert "--matrix-lr 1e+06" in line  # the hint names the hot LR
    for step in steps:  # every checkpoint left holds finite weights and optimizer state
        model = GPT.build(GPTConfig(**json.load(open(step_dir(str(run_dir / "checkpoints"), step) + "/meta.json"))["model_config"]),
                          "cpu")
        load_model_weights(model, step_dir(str(run_dir / "checkpoints"), step))
        state = load_rank_state(step_dir(str(run_dir / "checkpoints"), step), 0, 1)["optimizer"]["state"]
        assert check_finite(model.named_parameters()) is None
        assert check_finite([(k, v) for s in state.values() for k, v in s.items() if torch.is_tensor(v)]) is None


def test_nan_on_one_rank_stops_both_ranks_at_the_same_step():
    worker = os.path.join(REPO, "tests", "dist_diverge_worker.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker],
                            cwd=REPO, env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank} diverged at step 2: nan on rank 1 | unchanged=True" in result.stdout, result.stdout


def test_check_finite_names_the_first_bad_tensor():
    good, bad = torch.ones(3), torch.tensor([1.0, float("inf")])
    assert check_finite([("a", good), ("ids", torch.arange(3))]) is None
    assert check_finite([("a", good), ("b", bad), ("c", bad * float("nan"))]) == "b"


def test_spike_detector_flags_a_spike_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    noise = (0.05 * torch.randn(2000, generator=gen)).tolist()
    detector = SpikeDetector()
    # a noisy loss falling like a training curve: no false positive over 2000 steps
    flagged = [i for i, n in enumerate(noise) if detector.update(6.0 * (i + 10) ** -0.15 + n)]
    assert flagged == []
    level = 6.0 * 2010 ** -0.15
    spike = detector.update(level + 1.0)
    assert spike is not None and spike[0] == pytest.approx(level, abs=0.05)
    assert detector.update(level) is None  # the spike did not enter the window: the run is back to normal
    restored = SpikeDetector()
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert restored.update(level + 1.0) is not None and list(restored.recent) == list(detector.recent)


def test_lock_refuses_a_second_holder_and_is_taken_over_after_a_kill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nanochat.runs import RunDirLock; "
                               f"lock = RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=f"in use by another run .*PID {holder.pid}"):
            RunDirLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunDirLock(str(tmp_path)).acquire()  # the kernel dropped the dead holder's lock
    assert lock.took_over["pid"] == holder.pid
    lock.release()
    assert RunDirLock(str(tmp_path)).acquire().took_over is None  # a clean release leaves nothing to take over


def test_second_run_on_a_busy_dir_stops_at_once_and_the_first_finishes(tmp_path, tokenizer_dir, corpus_dir):
    run_dir = tmp_path / "busy"
    common = TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--run-dir", str(run_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_DTYPE")}
    first = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *common, "--num-iterations", "40", "--save-every", "20"],
                             cwd=REPO, env={**env, "NANOCHAT_BASE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:  # wait until the first run holds the lock (it prints its run dir right after)
            if line.startswith("run "):
                break
        # paused, so it still holds the lock when the second run gets there however slow the box (unpaused, a
        # 40-step d2 run could finish during the second's ~10 s start-up, which then meets its checkpoints)
        first.send_signal(signal.SIGSTOP)
        t0 = time.time()
        second = run(common + ["--num-iterations", "40"], tmp_path, check=False)
        assert time.time() - t0 < 60
        first.send_signal(signal.SIGCONT)
        one_line_error(second, "is in use by another run")
        assert f"PID {first.pid}" in second.stderr
        rest = first.stdout.read()
        assert first.wait(timeout=300) == 0, rest[-2000:]
    finally:
        first.kill()
    assert sorted(losses(run_dir)) == list(range(1, 41))  # one writer's log, every step once
    assert list_steps(str(run_dir / "checkpoints")) == [20, 40]
    # a fresh run on a dir holding checkpoints is refused; resuming the finished run trains nothing and logs nothing
    one_line_error(run(common + ["--num-iterations", "40"], tmp_path, check=False), "already holds checkpoints")
    lines_before = len(read_jsonl(run_dir / "log.jsonl"))
    out = run(common + ["--num-iterations", "40", "--resume-from-step", "latest"], tmp_path)
    assert "already finished at step 40" in out.stdout and len(read_jsonl(run_dir / "log.jsonl")) == lines_before
    # another horizon on resume needs saying so; with the flag it trains on to the new end
    one_line_error(run(common + ["--num-iterations", "44", "--resume-from-step", "20"], tmp_path, check=False),
                   "saved by a run of 40 steps and this one has 44")
    run(common + ["--num-iterations", "44", "--resume-from-step", "latest", "--allow-horizon-change"], tmp_path)
    assert max(losses(run_dir)) == 44
    run(common + ["--num-iterations", "4", "--overwrite"], tmp_path)  # --overwrite starts afresh
    assert list_steps(str(run_dir / "checkpoints")) == [4] and sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_unnamed_runs_get_their_own_dirs_and_are_found_again(tmp_path):
    names = [new_run_name(str(tmp_path), 2, now=1_800_000_000) for _ in range(3)]  # same second, three runs
    assert names[0].startswith("d2-") and names[1] == names[0] + "-2" and names[2] == names[0] + "-3"
    for i, name in enumerate(names):
        with open(tmp_path / "runs" / name / "run.json", "w") as f:
            json.dump({"created": 1_800_000_000 + i, "model_config": {"n_layer": 2}}, f)
    assert resolve_run_dir(names[1], str(tmp_path)) == str(tmp_path / "runs" / names[1])
    assert latest_run_dir(str(tmp_path)) == str(tmp_path / "runs" / names[2])
    with pytest.raises(RunDirError, match="no run of depth 4"):
        latest_run_dir(str(tmp_path), depth=4)
    with pytest.raises(RunDirError, match="no run 'nope'"):
        resolve_run_dir("nope", str(tmp_path))


def test_unnamed_run_prints_its_dir_and_wandb_without_login_goes_offline(tmp_path, tokenizer_dir, corpus_dir):
    common = TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "2"]
    out = run(common, tmp_path).stdout
    name = out.split("run ", 1)[1].split(" |")[0]
    assert name.startswith("d2-") and os.path.isfile(tmp_path / "runs" / name / "log.jsonl")
    assert "min val bpb" in out and "training time" in out and "0.0m" not in out and "eta 0.0m" not in out
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_MODE": "online", "NETRC": str(tmp_path / "none")}
    result = run(common + ["--run", "my-run"], tmp_path, env_extra=env, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "WARNING: wandb:" in result.stdout and "logging offline" in result.stdout
    assert os.path.isfile(tmp_path / "runs" / "my-run" / "log.jsonl")


def test_small_run_numbers_are_honest():
    assert format_duration(12.3) == "12.3s" and format_duration(150) == "2.5m" and format_duration(7200) == "2.00h"
    assert format_bpb(float("inf")) == "n/a (no evaluation ran)" and format_bpb(1.23456) == "1.2346"


def test_dry_run_reports_the_gpu_runs_dtype_and_flags_extrapolated_laws(tmp_path, tokenizer_dir):
    """--dry-run 8 describes the 8-rank (GPU) run, not this CPU; a d2 model's batch/WD laws are flagged as extrapolated."""
    out = run(["--depth", "2", "--max-seq-len", "64", "--dry-run", "8", "--tokenizer-dir", tokenizer_dir], tmp_path).stdout
    assert "compute_dtype        bfloat16 (the GPU run's; this machine would run float32)" in out
    assert "note: this model is" in out and "extrapolations" in out
    out = run(["--depth", "2", "--max-seq-len", "64", "--dry-run", "8", "--tokenizer-dir", tokenizer_dir,
               "--total-batch-size", "4096", "--weight-decay", "0.1", "--device-batch-size", "8"], tmp_path).stdout
    assert "note: this model is" not in out  # both chosen by hand: nothing to flag
