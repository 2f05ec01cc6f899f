"""Sweeps: data-order seed (reproducible, exact resume), paired statistics and trend fits on synthetic logs with
known answers, the scaling-law fit, the completion rule, skip-and-resume of a killed sweep, and the printed commands."""

import json
import math
import sys

import numpy as np
import pytest

from nanochat import sweep as stats
from nanochat.dataloader import DataLoader
from nanochat.dataset import permute_row_groups
from nanochat.report import RunLog
from scripts import sweep

SIGNATURE = {"tokenizer": "abc", "vocab_size": 4096, "sequence_len": 128, "packing": "stream-order-bos-one-pass",
             "val_data": ["shard_00007.parquet:1"], "eval_tokens": 2048}


# -----------------------------------------------------------------------------
# data seed

def test_permute_row_groups_is_reproducible_and_zero_is_file_order():
    groups = [(f, rg, 10) for f in range(3) for rg in range(4)]
    assert permute_row_groups(groups, None) == groups and permute_row_groups(groups, 0) == groups
    a, b = permute_row_groups(groups, 7), permute_row_groups(groups, 7)
    assert a == b != groups and sorted(a) == groups
    assert permute_row_groups(groups, 8) != a


def take(loader, n):
    return [x.clone() for x, _ in (next(loader) for _ in range(n))]


def test_data_seed_moves_the_order_and_resumes_exactly(tokenizer, tmp_path, write_parquet):
    for f in range(4):  # 3 train files of 4 row groups each, 1 val file
        write_parquet(tmp_path / f"shard_{f:05d}.parquet", [f"file {f} doc {i} " + "word " * (i % 7 + 1) for i in range(8)],
                      row_group_size=2)
    kwargs = dict(data_dir=str(tmp_path), buffer_size=3, prefetch_batches=2)
    with DataLoader(tokenizer, 2, 16, **kwargs) as plain, DataLoader(tokenizer, 2, 16, data_seed=5, **kwargs) as seeded:
        assert not all(torch_equal(a, b) for a, b in zip(take(plain, 4), take(seeded, 4)))
        state = plain.state_dict()
    with DataLoader(tokenizer, 2, 16, data_seed=5, **kwargs) as loader:
        reference = take(loader, 9)
    with DataLoader(tokenizer, 2, 16, data_seed=5, **kwargs) as loader:
        first = take(loader, 4)
        saved = json.loads(json.dumps(loader.state_dict()))
    with DataLoader(tokenizer, 2, 16, data_seed=5, **kwargs) as loader:
        loader.load_state_dict(saved)
        assert all(torch_equal(a, b) for a, b in zip(first + take(loader, 5), reference))
    with DataLoader(tokenizer, 2, 16, data_seed=5, **kwargs) as loader, pytest.raises(ValueError, match="data_seed"):
        loader.load_state_dict(state)  # a file-order state into a seeded loader would resume at the wrong place


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


# -----------------------------------------------------------------------------
# synthetic runs

def write_fake_run(directory, *, flops_per_step, offset, steps=40, eval_every=10, dt_s=1.0, arm_env=None):
    """A finished run as base_train writes it: bpb = 1 + 20/sqrt(step+4) + offset at every eval, final eval at `steps`."""
    info = {"hyperparameters": {"num_iterations": steps, "training_flops": flops_per_step * steps,
                                "params_scaling": 1, "training_tokens": 1},
            "data_signature": SIGNATURE, "args": {}}
    log = RunLog(str(directory), "fake", info)
    for step in range(0, steps + 1, eval_every):
        log.log({"step": step, "total_training_flops": flops_per_step * step, "total_training_time": dt_s * step,
                 "val/bpb": 1.0 + 20.0 / math.sqrt(step + 4.0) + offset})
    log.finish()


ARMS = (sweep.Arm("base"), sweep.Arm("new"))
DEPTHS = (2, 4, 8, 12)
FLOPS_PER_STEP = {d: 1e9 * d ** 3 for d in DEPTHS}  # final FLOPs 40x that


def write_ladder(out_dir, delta_of_flops, seeds=(1, 2, 3), noise=0.0):
    """Baseline and change runs per depth and seed; the change's offset is delta(final FLOPs) + seed noise."""
    rng = np.random.default_rng(0)
    for depth in DEPTHS:
        for seed in seeds:
            final_flops = FLOPS_PER_STEP[depth] * 40
            seed_offset = 0.01 * seed  # shared by both arms: the pairing must cancel it
            for arm, offset in zip(ARMS, (seed_offset, seed_offset + delta_of_flops(final_flops) + rng.normal(0, noise))):
                write_fake_run(sweep.run_dir(out_dir, sweep.RunSpec(arm, depth, seed)), flops_per_step=FLOPS_PER_STEP[depth],
                               offset=offset)


def test_paired_stats():
    s = stats.paired_stats([0.1, 0.2, 0.3])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.2) and s["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert s["t"] == pytest.approx(0.2 / s["se"])
    assert stats.paired_stats([0.5])["se"] is None and stats.paired_stats([])["mean"] is None


def test_gain_shrinking_as_inverse_flops_recovers_shrinkage_and_zero_crossing(tmp_path):
    """Δ = cost - k/C: a gain ~1/FLOPs over a fixed cost; crossing at C0 = k/cost, beyond the ladder."""
    final = [FLOPS_PER_STEP[d] * 40 for d in DEPTHS]
    cost, c0 = 0.002, 10 * max(final)
    k = cost * c0
    write_ladder(str(tmp_path), lambda c: cost - k / c, noise=1e-5)
    rows = sweep.paired_table(str(tmp_path), *ARMS, DEPTHS, [1, 2, 3])
    assert [r["depth"] for r in rows] == list(DEPTHS)
    for r in rows:  # the same Δ at matched steps, time and FLOPs (every step costs the same in both arms)
        for s in r["stats"].values():
            assert s["n"] == 3 and s["mean"] == pytest.approx(cost - k / r["flops"], abs=5e-5)
    trend = sweep.trend_for(rows, "total_training_flops", "inverse")
    assert trend["shrinking"]
    assert trend["b"] == pytest.approx(-k, rel=0.1)
    assert trend["zero_flops"] == pytest.approx(c0, rel=0.1)
    # the default log-FLOPs line sees the gain shrink too (it cannot place a 1/C crossing: hence --trend inverse)
    assert sweep.trend_for(rows, "total_training_flops", "log")["shrinking"]


def test_gain_linear_in_log_flops_recovers_crossing_and_depth(tmp_path):
    final = {d: FLOPS_PER_STEP[d] * 40 for d in DEPTHS}
    c0 = final[12] * 27  # (12 * 3)^3 * 1e9 * 40: the ladder's FLOPs grow as depth^3, so depth 36
    write_ladder(str(tmp_path), lambda c: 0.003 * math.log10(c / c0), noise=2e-5)
    rows = sweep.paired_table(str(tmp_path), *ARMS, DEPTHS, [1, 2, 3])
    trend = sweep.trend_for(rows, "step", "log")
    assert trend["shrinking"] and trend["b"] == pytest.approx(0.003, rel=0.1)
    assert trend["zero_flops"] == pytest.approx(c0, rel=0.1)
    assert trend["zero_depth"] == pytest.approx(36, rel=0.1)


def test_growing_gain_has_no_zero_crossing():
    trend = stats.fit_delta_trend([1e10, 1e11, 1e12], [-0.001, -0.002, -0.003], [2, 4, 8])
    assert not trend["shrinking"] and trend["zero_flops"] is None and "does not shrink" in trend["note"]


def test_report_writes_table_and_png(tmp_path, capsys):
    write_ladder(str(tmp_path), lambda c: -1e12 / c)
    args, _ = sweep.parse_args(["--out", str(tmp_path), "--depths", "2,4,8,12", "--seeds", "3", "--report-only",
                                "--baseline", "base:", "--change", "new: --warmdown-frac 0.5"])
    text = sweep.report(args, *ARMS[:1], ARMS[1:], str(tmp_path))
    assert "new vs base" in text and "d12" in text and "|Δ| shrinks with compute" in text
    assert open(tmp_path / "sweep.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# -----------------------------------------------------------------------------
# scaling law

def test_scaling_law_fit_recovers_the_compute_optimal_ratio():
    truth = {"E": 0.8, "A": 40.0, "B": 120.0, "alpha": 0.34, "beta": 0.28}
    params, tokens, losses = [], [], []
    for n in (1e5, 3e5, 1e6, 3e6):
        for ratio in (2, 4, 8, 16, 32):
            params.append(n)
            tokens.append(ratio * n)
            losses.append(truth["E"] + truth["A"] / n ** truth["alpha"] + truth["B"] / (ratio * n) ** truth["beta"])
    fit = stats.fit_loss_surface(params, tokens, losses)
    for c in (1e12, 1e14):
        assert stats.compute_optimal(fit, c)["ratio"] == pytest.approx(stats.compute_optimal(truth, c)["ratio"], rel=0.1)
    k, gamma = stats.frontier_power_law(fit)
    assert gamma == pytest.approx(0.34 * 0.28 / 0.62, rel=0.1)
    opt = stats.compute_optimal(fit, 1e13)
    assert fit["E"] + k * 1e13 ** -gamma == pytest.approx(opt["loss"], rel=1e-6)


def test_scaling_law_needs_enough_runs():
    with pytest.raises(ValueError, match="at least 6"):
        stats.fit_loss_surface([1, 2, 3], [1, 2, 3], [3, 2, 1])


# -----------------------------------------------------------------------------
# completion, skip and resume, commands

def test_completion_rule(tmp_path):
    spec = sweep.RunSpec(sweep.Arm("a", {"X": "1"}), 2, 1)
    signature = sweep.run_signature(spec, ["--num-iterations", "40"])
    d = tmp_path / "run"
    assert sweep.run_status(str(d), signature) == "todo"  # nothing there
    write_fake_run(d, flops_per_step=1.0, offset=0.0, steps=40)
    (d / sweep.SIGNATURE_FILE).write_text(json.dumps(signature))
    assert sweep.run_status(str(d), signature) == "done" and sweep.final_val_bpb(str(d)) is not None
    other = sweep.run_signature(spec, ["--num-iterations", "50"])
    with pytest.raises(sweep.SweepError, match="different command"):
        sweep.run_status(str(d), other)
    lines = (d / "log.jsonl").read_text().splitlines()
    (d / "log.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # killed before the final evaluation
    assert sweep.run_status(str(d), signature) == "todo" and sweep.run_status(str(d), other) == "todo"


FAKE_TRAIN = r'''
import json, math, os, sys
argv = sys.argv[sys.argv.index("scripts.base_train") + 1:]
flag = lambda name: argv[len(argv) - 1 - argv[::-1].index(name) + 1]
run_dir, depth, seed = flag("--run-dir"), int(flag("--depth")), int(flag("--seed"))
assert flag("--data-seed") == str(seed)
with open(os.path.join(os.path.dirname(run_dir.rstrip("/")), "..", "..", "calls.txt"), "a") as f:
    f.write(run_dir + "\n")
if os.path.isdir(os.path.join(run_dir, "checkpoints")) and "--overwrite" not in argv:
    sys.exit("already holds checkpoints")  # base_train's refusal (tests/test_run_guards.py)
if os.environ.get("FAKE_FAIL") and run_dir.endswith(os.environ["FAKE_FAIL"]):
    os.makedirs(os.path.join(run_dir, "checkpoints"))  # a killed base_train saves on its way out
    sys.exit(3)
os.makedirs(run_dir, exist_ok=True)
steps, flops = 20, 1e9 * depth ** 3
ratio = float(flag("--target-param-data-ratio")) if "--target-param-data-ratio" in argv else 10.0
params = 1e5 * depth ** 2
final = 0.8 + 40 / params ** 0.34 + 120 / (ratio * params) ** 0.28  # a known loss surface for --scaling-law
json.dump({"hyperparameters": {"num_iterations": steps, "training_flops": 6 * params * ratio * params,
                               "params_scaling": params, "training_tokens": ratio * params}, "data_signature": {}},
          open(os.path.join(run_dir, "run.json"), "w"))
with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
    for step in (0, 10, 20):
        bpb = final + 10 / math.sqrt(step + 1) - 10 / math.sqrt(21)
        bpb += float(os.environ.get("FAKE_OFFSET", "0")) / depth + 0.001 * seed
        f.write(json.dumps({"step": step, "total_training_flops": flops * step, "total_training_time": step * 0.1,
                            "val/bpb": bpb}) + "\n")
'''


def run_sweep(out_dir, fake, tokenizer_dir, monkeypatch, fail=""):
    monkeypatch.setenv("FAKE_FAIL", fail)
    return sweep.main(["--out", str(out_dir), "--depths", "2,4", "--seeds", "2", "--flops-per-s", "1e12",
                       "--baseline", "base:", "--change", "new: FAKE_OFFSET=-0.1 --warmdown-frac 0.5",
                       "--wrap", f"{sys.executable} {fake}", "--",
                       "--tokenizer-dir", tokenizer_dir, "--max-seq-len", "64", "--device-batch-size", "2",
                       "--total-batch-size", "128", "--num-iterations", "20"])


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """First sweep: one run dies (as if killed, leaving a checkpoint). Rerun: only that run is launched again, afresh;
    the report pairs all 8."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    out = tmp_path / "sweep"
    with pytest.raises(sweep.SweepError, match="1 run\\(s\\) failed: new/d4_s1"):
        run_sweep(out, fake, tokenizer_dir, monkeypatch, fail="new/d4_s1")
    first = capsys.readouterr().out
    assert "0 already complete (skipped), 8 to run" in first and "FAILED new/d4_s1" in first
    calls = (out / "calls.txt").read_text().split()
    assert len(calls) == 8
    text = run_sweep(out, fake, tokenizer_dir, monkeypatch)
    second = capsys.readouterr().out
    assert "7 already complete (skipped), 1 to run" in second and "skip (complete) base/d2_s1" in second
    calls = (out / "calls.txt").read_text().split()
    assert len(calls) == 9 and calls[-1].endswith("runs/new/d4_s1")  # only the dead run was redone
    # the printed command is the one that ran, with the arm's env var and flags, and it is logged
    launched = [line for line in second.splitlines() if "scripts.base_train" in line]
    assert len(launched) == 1 and launched[0].split("] ", 1)[1].startswith(f"FAKE_OFFSET=-0.1 {sys.executable} {fake}")
    assert "--depth 4 --seed 1 --data-seed 1" in launched[0] and launched[0].rstrip().endswith("runs/new/d4_s1")
    assert launched[0].split("] ", 1)[1] in (out / "commands.log").read_text()
    assert "Δ = " in text and "-0.0500" in text  # d2: offset -0.1/2, paired exactly


def test_first_seed_adds_seeds_without_rerunning_the_earlier_ones(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """--first-seed 2 on an empty sweep dir: only seed 2's runs are launched (seed 1's live on another box)."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    out = tmp_path / "sweep"
    monkeypatch.setenv("FAKE_FAIL", "")
    sweep.main(["--out", str(out), "--depths", "2", "--seeds", "2", "--first-seed", "2", "--flops-per-s", "1e12",
                "--baseline", "base:", "--change", "new: FAKE_OFFSET=-0.1", "--wrap", f"{sys.executable} {fake}", "--",
                "--tokenizer-dir", tokenizer_dir, "--max-seq-len", "64", "--device-batch-size", "2",
                "--total-batch-size", "128", "--num-iterations", "20"])
    assert "0 already complete (skipped), 2 to run" in capsys.readouterr().out
    assert sorted(c.rsplit("runs/", 1)[1] for c in (out / "calls.txt").read_text().split()) == ["base/d2_s2", "new/d2_s2"]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--out", str(out), "--seeds", "2", "--first-seed", "3", "--change", "x: --fp8"])


def test_dry_run_prints_commands_and_estimate_runs_nothing(tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "sweep"
    sweep.main(["--out", str(out), "--depths", "2", "--seeds", "1", "--flops-per-s", "1e9", "--overhead-s", "0",
                "--devices", "0,1,2,3", "--nproc-per-node", "2", "--dry-run", "--change", "bf16: NANOCHAT_DTYPE=bfloat16",
                "--", "--tokenizer-dir", tokenizer_dir, "--max-seq-len", "64", "--device-batch-size", "2",
                "--total-batch-size", "256", "--num-iterations", "10", "--eval-every", "-1", "--eval-tokens", "256"])
    printed = capsys.readouterr().out
    commands = [line for line in printed.splitlines() if "scripts.base_train" in line]
    assert len(commands) == 2 and not (out / "runs").exists()
    assert commands[0].startswith("CUDA_VISIBLE_DEVICES=0,1 ")  # 2 slots of 2 GPUs: one run each, in parallel
    assert commands[1].startswith("CUDA_VISIBLE_DEVICES=2,3 NANOCHAT_DTYPE=bfloat16 ")
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m scripts.base_train -- --depth 2" in commands[1]
    # the estimate is FLOPs / rate: base_train's own resolution of the horizon, at 1e9 FLOP/s, 2 slots in parallel
    flops, hp = sweep.run_flops(sweep.RunSpec(sweep.Arm("b"), 2, 1), ["--tokenizer-dir", tokenizer_dir, "--max-seq-len", "64",
                                "--device-batch-size", "2", "--total-batch-size", "256", "--num-iterations", "10",
                                "--eval-every", "-1", "--eval-tokens", "256"], 2048, 2)
    assert hp["training_flops"] == hp["flops_per_token"] * 256 * 10
    assert f"estimate: {2 * flops / 1e9 / 2 / 60:.1f} min for 2 runs" in printed


def test_arm_parsing_and_device_slots(monkeypatch):
    arm = sweep.parse_arm("bf16: NANOCHAT_DTYPE=bfloat16 --matrix-lr 0.03", "x")
    assert (arm.name, arm.env, arm.flags) == ("bf16", {"NANOCHAT_DTYPE": "bfloat16"}, ["--matrix-lr", "0.03"])
    assert sweep.parse_arm("--fp8", "change1").name == "change1"
    with pytest.raises(sweep.SweepError, match="--depth"):
        sweep.parse_arm("bad: --depth 4", "x")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert sweep.device_slots(["0", "1", "2", "3"], 1, n_cpus=16) == [{"CUDA_VISIBLE_DEVICES": str(i), "OMP_NUM_THREADS": "4"}
                                                                   for i in range(4)]
    assert sweep.device_slots(["0", "1"], 1, n_cpus=2)[1] == {"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "1"}
    assert sweep.device_slots(["0", "1", "2", "3"], 2, n_cpus=2)[0]["OMP_NUM_THREADS"] == "1"  # at least one
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert sweep.device_slots(["0", "1"], 1, n_cpus=2) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    with pytest.raises(sweep.SweepError, match="multiple"):
        sweep.device_slots(["0", "1", "2"], 2)
    assert sweep.format_command(["python", "-m", "x", "a b"], {"K": "v w"}) == "K='v w' python -m x 'a b'"


def test_scaling_law_mode_end_to_end(tmp_path, tokenizer_dir, capsys):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    out = tmp_path / "law"
    text = sweep.main(["--out", str(out), "--scaling-law", "--depths", "2,4,8", "--ratios", "2,8,32", "--seeds", "1",
                       "--flops-per-s", "1e12", "--wrap", f"{sys.executable} {fake}", "--",
                       "--tokenizer-dir", tokenizer_dir, "--max-seq-len", "64", "--device-batch-size", "2"])
    assert "--target-param-data-ratio 32" in capsys.readouterr().out
    truth = {"E": 0.8, "A": 40.0, "B": 120.0, "alpha": 0.34, "beta": 0.28}
    c_max = 6 * 32 * (1e5 * 64) ** 2
    expected = stats.compute_optimal(truth, c_max)["ratio"]
    line = next(line for line in text.splitlines() if line.startswith(f"compute-optimal at {c_max:.3g}"))
    assert float(line.split("tokens:params ")[1].split(",")[0]) == pytest.approx(expected, rel=0.1)
    assert "notes (Kaplan-style) 10.5" in text and (out / "sweep.png").exists()
