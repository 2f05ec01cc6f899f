"""compare_runs: matched-budget verdicts on synthetic runs with known crossings, noise, signature refusal, PNG, MFU health."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nanochat.report import RunLog
from scripts.compare_runs import compare_axis, eval_noise, load_run, main, mfu_health, format_mfu_health, overall_verdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNATURE = {"tokenizer": "abc123", "vocab_size": 8192, "sequence_len": 256, "packing": "best-fit-bos",
             "val_data": ["shard_00007.parquet:1234"], "eval_tokens": 65536}
FLOPS_PER_STEP = 1e12


def bpb_curve(step):
    return 1.0 + 4.0 / np.sqrt(step + 25.0)  # power-law-like: still falling at the end, as short runs are


def write_run(run_dir, *, offset=0.0, dt_s=1.0, flops_per_step=FLOPS_PER_STEP, noise_sd=0.001, seed=0, steps=1000,
              eval_every=50, device=None, signature=None, mfu=0.5, data_s=0.0, optim_s=0.0, args=None, hyperparameters=None):
    """A run directory written by the real RunLog, records shaped as base_train logs them.

    bpb = bpb_curve(step) + offset + Gaussian eval noise; every step takes dt_s and flops_per_step.
    """
    rng = np.random.default_rng(seed)
    info = {"args": {"device_batch_size": 8, "max_seq_len": 256, **(args or {})},
            "hyperparameters": {"compute_dtype": "float32", **(hyperparameters or {})},
            "data_signature": signature or SIGNATURE,
            "device": device or {"type": "cpu", "name": "cpu", "world_size": 1, "peak_flops": 1.8e11, "attention": "sdpa"}}
    log = RunLog(str(run_dir), "d4", info)
    for step in range(steps + 1):
        progress = {"step": step, "total_training_flops": flops_per_step * step, "total_training_time": dt_s * step}
        if step > 0:
            loss = 2 * float(bpb_curve(step))
            log.log({**progress, "train/loss": loss, "train/loss_smooth": loss, "train/dt": dt_s, "train/dt_data": data_s,
                     "train/dt_optim": optim_s, "train/tok_per_sec": 2048 / dt_s, "train/mfu": mfu, "train/skipped": False})
        if step % eval_every == 0:
            log.log({**progress, "val/bpb": float(bpb_curve(step) + offset + rng.normal(0.0, noise_sd))})
    log.finish()
    return str(run_dir)


def verdicts_for(*dirs):
    runs = [load_run(d) for d in dirs]
    return [compare_axis(runs, key) for key in ("step", "total_training_time", "total_training_flops")]


def test_better_per_step_but_worse_per_second(tmp_path):
    # A: 0.01 bpb lower at every step, but each step takes twice as long; same FLOPs per step
    a = write_run(tmp_path / "A", offset=-0.01, dt_s=2.0, seed=1)
    b = write_run(tmp_path / "B", dt_s=1.0, seed=2)
    step, time, flops = verdicts_for(a, b)
    assert (step["winner"], time["winner"], flops["winner"]) == ("A", "B", "A")
    assert step["gap"] == pytest.approx(0.01, abs=0.004)
    # matched time = B's whole run (1000 s); A got there at step 500 and is interpolated there
    assert time["budget"] == 1000.0
    assert time["bpb"]["A"] == pytest.approx(bpb_curve(500) - 0.01, abs=0.004)
    assert time["gap"] == pytest.approx(bpb_curve(500) - 0.01 - bpb_curve(1000), abs=0.005)
    assert all(v["beyond_noise"] for v in (step, time, flops))
    assert "no run wins on all three axes" in overall_verdict([step, time, flops])


def test_better_on_all_axes(tmp_path):
    a = write_run(tmp_path / "A", offset=-0.02, seed=3)
    b = write_run(tmp_path / "B", seed=4)
    verdicts = verdicts_for(a, b)
    assert [v["winner"] for v in verdicts] == ["A", "A", "A"]
    # A reaches B's final bpb where bpb_curve(s) - 0.02 = bpb_curve(1000)
    target_step = (4.0 / (bpb_curve(1000) - 1.0 + 0.02)) ** 2 - 25.0
    assert verdicts[0]["budget_ratio"] == pytest.approx(target_step / 1000, abs=0.05)
    assert overall_verdict(verdicts) == "overall: A WINS on all three axes"


def test_equal_within_noise(tmp_path):
    a = write_run(tmp_path / "A", noise_sd=0.003, seed=5)
    b = write_run(tmp_path / "B", noise_sd=0.003, seed=6)
    verdicts = verdicts_for(a, b)
    assert all(v["beyond_noise"] is False and v["winner"] is None for v in verdicts)
    assert all(v["gap"] < v["gap_noise"] for v in verdicts)
    assert "no run wins" in overall_verdict(verdicts)


def test_pure_speedup_wins_only_on_time(tmp_path):
    # same numerics per step (think: compiled vs eager), A twice as fast per step
    a = write_run(tmp_path / "A", dt_s=0.5, noise_sd=0.002, seed=9)
    b = write_run(tmp_path / "B", dt_s=1.0, noise_sd=0.002, seed=10)
    verdicts = verdicts_for(a, b)
    assert [v["winner"] for v in verdicts] == [None, "A", None]
    assert overall_verdict(verdicts).endswith("; A wins on time and is within noise on the rest")


def test_noise_estimate_recovers_the_injected_scatter():
    steps = np.arange(0, 2001, 50, dtype=float)
    smooth = bpb_curve(steps)
    assert eval_noise(steps, smooth) < 2e-4  # curvature alone is not mistaken for noise
    rng = np.random.default_rng(0)
    estimates = [eval_noise(steps, smooth + rng.normal(0, 0.004, len(steps))) for _ in range(20)]
    assert 0.003 < np.mean(estimates) < 0.005
    assert eval_noise(steps[:4], smooth[:4]) is None  # three evals after step 0 cannot measure scatter


def test_a_run_with_fewer_steps_is_compared_where_both_have_data(tmp_path):
    a = write_run(tmp_path / "A", offset=-0.01, steps=600, seed=7)
    b = write_run(tmp_path / "B", steps=1000, seed=8)
    step, _, _ = verdicts_for(a, b)
    assert step["budget"] == 600 and step["winner"] == "A"
    assert step["bpb"]["B"] == pytest.approx(bpb_curve(600), abs=0.004)


def test_cli_writes_png_and_table(tmp_path, capsys):
    a = write_run(tmp_path / "A", offset=-0.01, dt_s=2.0, seed=1)
    b = write_run(tmp_path / "B", dt_s=1.0, seed=2)
    out = tmp_path / "cmp.png"
    main([a, b, "--out", str(out)])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 20_000  # four panels of curves, not an empty canvas
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    text = capsys.readouterr().out
    assert "overall: no run wins on all three axes (step: A, time: B, flops: A)" in text
    assert "MFU health" in text and "measured CPU" in text
    assert "995 timed steps" in text  # steps 1..1000 logged, the first 5 (one-off costs) left out of the timing


def test_mismatched_data_refuses_and_names_fields(tmp_path, capsys):
    a = write_run(tmp_path / "A", seed=1)
    b = write_run(tmp_path / "B", seed=2, signature={**SIGNATURE, "sequence_len": 512, "val_data": ["other.parquet:1"]})
    out = tmp_path / "cmp.png"
    with pytest.raises(SystemExit) as e:
        main([a, b, "--out", str(out)])
    message = str(e.value.code)
    assert "sequence_len" in message and "val_data" in message and "--force" in message
    assert "tokenizer" not in message and "packing" not in message
    assert not out.exists()
    main([a, b, "--out", str(out), "--force"])
    assert out.exists()
    assert "WARNING (--force)" in capsys.readouterr().err


def test_cli_exit_status_on_refusal(tmp_path):
    a = write_run(tmp_path / "A", seed=1, steps=100)
    b = write_run(tmp_path / "B", seed=2, steps=100, signature={**SIGNATURE, "packing": "greedy"})
    proc = subprocess.run([sys.executable, "-m", "scripts.compare_runs", a, b, "--out", str(tmp_path / "x.png")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "packing" in proc.stderr


def test_log_path_without_run_json_is_refused_until_forced(tmp_path):
    a = write_run(tmp_path / "A", seed=1, steps=200)
    bare = tmp_path / "bare"
    os.makedirs(bare)
    os.replace(os.path.join(a, "log.jsonl"), bare / "log.jsonl")
    b = write_run(tmp_path / "B", seed=2, steps=200)
    with pytest.raises(SystemExit) as e:
        main([str(bare / "log.jsonl"), b, "--out", str(tmp_path / "x.png")])
    assert all(k in str(e.value.code) for k in ("tokenizer", "sequence_len", "packing", "val_data", "eval_tokens"))
    verdicts = main([str(bare / "log.jsonl"), b, "--out", str(tmp_path / "x.png"), "--force"])
    assert set(verdicts[0]["bpb"]) == {"bare", "B"}


def test_same_dir_names_get_full_paths_as_labels(tmp_path):
    a = write_run(tmp_path / "x" / "d4", seed=1, steps=200)
    b = write_run(tmp_path / "y" / "d4", seed=2, steps=200)
    verdicts = main([a, b, "--out", str(tmp_path / "x.png")])
    assert set(verdicts[0]["bpb"]) == {a, b}


def test_wandb_path_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit) as e:
        load_run("someone/nanochat/abc123")
    assert "network" in str(e.value.code) and "local run directory" in str(e.value.code)


def test_mfu_health_on_gpu_names_the_bottleneck(tmp_path):
    gpu = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "world_size": 8, "peak_flops": 989e12, "attention": "fa3"}
    d = write_run(tmp_path / "A", steps=100, device=gpu, mfu=0.2, dt_s=1.0, data_s=0.3, optim_s=0.05)
    # the first steps are slow (one-off costs) and must not count
    lines = open(os.path.join(d, "log.jsonl")).read().splitlines()
    for i, line in enumerate(lines):
        r = json.loads(line)
        if r.get("train/dt") and r["step"] <= 3:
            r.update({"train/dt": 50.0, "train/mfu": 0.004, "train/dt_data": 0.0})
            lines[i] = json.dumps(r)
    open(os.path.join(d, "log.jsonl"), "w").write("\n".join(lines) + "\n")
    health = mfu_health(load_run(d), skip_steps=5)
    assert health["mfu"] == pytest.approx(0.2) and health["data_wait_frac"] == pytest.approx(0.3)
    assert health["optim_frac"] == pytest.approx(0.05) and health["steps"] == 95
    assert "data wait is 30%" in health["diagnosis"] and "data wait is 30%" in format_mfu_health(health)
    healthy = mfu_health(load_run(write_run(tmp_path / "B", steps=100, device=gpu, mfu=0.5)))
    assert healthy["diagnosis"] == "" and "healthy" in format_mfu_health(healthy)


def test_mfu_health_on_cpu_reports_the_measured_peak_without_gpu_diagnosis(tmp_path):
    health = mfu_health(load_run(write_run(tmp_path / "A", steps=50, mfu=0.1, data_s=0.5)))
    assert health["diagnosis"] == "" and health["mfu"] == pytest.approx(0.1)
    assert "measured CPU float32 matmul peak 1.8e+11" in format_mfu_health(health)


def test_too_few_evals_is_no_verdict(tmp_path):
    """A lead without a noise estimate (3 evals) is reported, never called a win."""
    a = write_run(tmp_path / "A", offset=-0.05, steps=100, eval_every=50, seed=1)
    b = write_run(tmp_path / "B", steps=100, eval_every=50, seed=2)
    verdicts = verdicts_for(a, b)
    assert all(v["best"] == "A" and v["beyond_noise"] is None and v["winner"] is None for v in verdicts)
    line = overall_verdict(verdicts)
    assert "no verdict" in line and "WINS" not in line


# -----------------------------------------------------------------------------
# a newcomer's edge cases (issue 30)

def test_runs_are_found_by_name_under_the_base_dir(tmp_path, monkeypatch):
    """The names base_train prints (--run, or d<depth>-<time>) work as well as paths."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    write_run(tmp_path / "runs" / "baseline", seed=1, steps=200)
    write_run(tmp_path / "runs" / "d4-20261202-141503", offset=-0.05, seed=2, steps=200)
    verdicts = main(["baseline", "d4-20261202-141503", "--out", str(tmp_path / "x.png")])
    assert set(verdicts[0]["bpb"]) == {"baseline", "d4-20261202-141503"}
    with pytest.raises(SystemExit) as e:
        main(["baseline", "nope", "--out", str(tmp_path / "x.png")])
    assert "nope: no such run under" in str(e.value.code) and "baseline" in str(e.value.code)


def test_the_same_run_twice_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    a = write_run(tmp_path / "runs" / "A", seed=1, steps=200)
    for twice in ([a, a], [a, os.path.join(a, "log.jsonl")], ["A", a + "/"]):
        with pytest.raises(SystemExit) as e:
            main(twice + ["--out", str(tmp_path / "x.png")])
        assert "are the same run" in str(e.value.code) and "\n" not in str(e.value.code)


def test_a_run_without_val_bpb_is_no_result_not_a_tie(tmp_path, capsys):
    """A run stopped before its first eval has no bpb to compare: saying 'tie' would claim it matched."""
    a = write_run(tmp_path / "A", seed=1, steps=200)
    cut = write_run(tmp_path / "cut", seed=2, steps=200)
    log = os.path.join(cut, "log.jsonl")
    records = [json.loads(line) for line in open(log)]
    open(log, "w").writelines(json.dumps(r) + "\n" for r in records if "val/bpb" not in r and r["step"] <= 30)
    verdicts = main([a, cut, "--out", str(tmp_path / "x.png")])
    line = overall_verdict(verdicts)
    assert "tie" not in line and line.startswith("overall: no result") and "cut has no val bpb" in line
    assert all(v["best"] is None and v["missing"] == ["cut"] for v in verdicts)
    assert capsys.readouterr().out.count("no result: no val/bpb") == 3
    # an axis without a result among axes with one is named so in the summary, not a tie
    partial = verdicts_for(a, write_run(tmp_path / "B", seed=3, steps=200))[:2] + [verdicts[2]]
    assert "flops: no result" in overall_verdict(partial)


def test_the_plot_keeps_the_step_0_eval_in_range(tmp_path, monkeypatch):
    import matplotlib.figure
    from scripts.compare_runs import plot_runs
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    monkeypatch.setattr(os, "replace", lambda *a: None)  # savefig wrote nothing to rename
    runs = [load_run(write_run(tmp_path / name, seed=i, steps=200)) for i, name in enumerate("AB")]
    verdicts = [compare_axis(runs, key) for key in ("step", "total_training_time", "total_training_flops")]
    plot_runs(runs, verdicts, str(tmp_path / "x.png"))
    step0 = max(r["val/bpb"] for run in runs for r in run.records if r["step"] == 0 and "val/bpb" in r)
    for ax in saved[0].axes[:3]:  # the three val bpb panels (their insets come after the four panels)
        low, high = ax.get_ylim()
        assert low <= bpb_curve(200) and high >= step0, (ax.get_title(), ax.get_ylim(), step0)


def test_the_noise_column_says_it_is_the_threshold(tmp_path):
    from scripts.compare_runs import format_verdict_table
    runs = [load_run(write_run(tmp_path / name, seed=i, steps=300)) for i, name in enumerate("AB")]
    verdicts = [compare_axis(runs, key) for key in ("step", "total_training_time", "total_training_flops")]
    legend, header = format_verdict_table(runs, verdicts).splitlines()[:2]
    assert "2σ noise" in header and "'2σ noise' = 2 x sqrt(sigma_best^2 + sigma_next^2), the threshold" in legend
    assert "3σ noise" in format_verdict_table(runs, verdicts, noise_sigmas=3).splitlines()[1]


def test_it_prints_the_settings_that_differ(tmp_path, capsys):
    same = {"depth": 4, "seed": 1}
    a = write_run(tmp_path / "A", seed=1, steps=200, args={**same, "matrix_lr": 0.02, "run": "A", "run_dir": "/x/A"},
                  hyperparameters={"matrix_lr": 0.01, "num_iterations": 200})
    b = write_run(tmp_path / "B", seed=2, steps=200, args={**same, "matrix_lr": 0.04, "run": "B", "run_dir": "/x/B"},
                  hyperparameters={"matrix_lr": 0.02, "num_iterations": 200})
    main([a, b, "--out", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert "flags that differ: --matrix-lr A=0.02 | B=0.04\n" in out
    assert "resolved hyperparameters that differ: matrix_lr A=0.01 | B=0.02\n" in out
    c = write_run(tmp_path / "C", seed=3, steps=200, args={**same, "matrix_lr": 0.02, "run": "C", "run_dir": "/x/C"},
                  hyperparameters={"matrix_lr": 0.01, "num_iterations": 200})
    main([a, c, "--out", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert "flags that differ: none\nresolved hyperparameters that differ: none" in out  # name, dir and time are no settings
