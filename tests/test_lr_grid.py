"""dev/lr_grid.py on synthetic run dirs: the fit recovers a known exponent, `save` keeps finished runs only, and
a report from the saved CSV alone (run dirs gone, as on a fresh machine) equals the report from the run dirs."""

import importlib.util
import json
import math
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("lr_grid", os.path.join(REPO, "dev", "lr_grid.py"))
lr_grid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lr_grid)

TOKENS, ALPHA, MULTS = 2**16, 0.1, [1, 2, 4, 8, 16, 32]


def write_run(directory, bpb, steps, finished=True):
    os.makedirs(directory)
    with open(os.path.join(directory, "run.json"), "w") as f:
        json.dump({"hyperparameters": {"num_iterations": steps, "training_tokens": TOKENS}}, f)
    with open(os.path.join(directory, "log.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "val/bpb": 3.0}) + "\n")
        if finished:
            f.write(json.dumps({"step": steps, "val/bpb": bpb}) + "\n")


def make_grid(out):
    """val bpb a parabola in log2(k) with its vertex at the k* that LR scale (B/2^19)^ALPHA gives, + seed noise
    that averages out; d6_s2 at 2^13 x32 (away from the optimum) is killed before its final eval."""
    for b in (11, 13, 15):
        k_star = 2 ** ((0.5 - ALPHA) * (19 - b))
        for m in MULTS:
            for seed, noise in ((1, -0.01), (2, 0.01)):
                bpb = 1.5 + 0.05 * (math.log2(m) - math.log2(k_star)) ** 2 + noise
                write_run(os.path.join(out, f"b{b}", "runs", f"lr{m:g}", f"d6_s{seed}"), bpb, TOKENS // 2**b,
                          finished=(b, m, seed) != (13, 32, 2))


def grid_cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["lr_grid.py", *argv])
    lr_grid.main()


def test_save_then_report_from_the_csv_alone(tmp_path, monkeypatch, capsys):
    out, csv_path = tmp_path / "grid", tmp_path / "runs.csv"
    make_grid(str(out))
    axes = ["--out", str(out), "--depths", "6", "--seeds", "2", "--tokens", str(TOKENS),
            "--mults", ",".join(map(str, MULTS))]
    grid_cli(monkeypatch, "report", *axes)
    from_dirs = (out / "grid.txt").read_text()
    fit = [line for line in from_dirs.splitlines() if "alpha =" in line]
    assert fit and f"alpha = {ALPHA:.3f}" in fit[0], from_dirs  # three interior optima, exact parabolas
    assert "(n=1)" in from_dirs  # the killed run is not counted

    grid_cli(monkeypatch, "save", *axes, "--results", str(csv_path))
    assert "35 runs added, 35 in all" in capsys.readouterr().out  # 3 x 6 x 2, less the killed one
    rows = csv_path.read_text().splitlines()
    assert rows[0] == ",".join(lr_grid.RESULT_FIELDS) and len(rows) == 36
    grid_cli(monkeypatch, "save", *axes, "--results", str(csv_path))
    assert "0 runs added, 35 in all" in capsys.readouterr().out

    shutil.rmtree(out / "b13")
    grid_cli(monkeypatch, "report", *axes)
    assert "2^13" not in (out / "grid.txt").read_text()  # without the CSV the gone runs are gone
    grid_cli(monkeypatch, "report", *axes, "--results", str(csv_path))
    assert (out / "grid.txt").read_text() == from_dirs


def test_a_broken_results_csv_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "runs.csv"
    bad.write_text("log2_batch,arm\n13,lr8\n")
    with pytest.raises(SystemExit, match="not a results CSV from `lr_grid.py save`"):
        grid_cli(monkeypatch, "report", "--out", str(tmp_path), "--results", str(bad))
