"""report.py: the local JSONL log, its resume truncation, MFU and the low-MFU diagnosis."""

import json
import math
import os

from nanochat.report import RunLog, diagnose_low_mfu, model_flops_utilization, read_jsonl


def test_jsonl_log_and_run_info(tmp_path):
    log = RunLog(str(tmp_path), "r1", {"data_signature": {"sequence_len": 256}})
    log.log({"step": 1, "train/loss": 5.0, "train/mfu": None})
    log.log({"step": 2, "train/loss": float("nan")})
    log.finish()
    records = read_jsonl(os.path.join(tmp_path, "log.jsonl"))
    assert records == [{"step": 1, "train/loss": 5.0, "train/mfu": None}, {"step": 2, "train/loss": None}]
    info = json.load(open(os.path.join(tmp_path, "run.json")))
    assert info["run"] == "r1" and info["data_signature"] == {"sequence_len": 256}


def test_resume_drops_the_crashed_tail(tmp_path):
    log = RunLog(str(tmp_path), "r", {})
    for step in range(1, 8):
        log.log({"step": step})
    log.finish()
    log = RunLog(str(tmp_path), "r", {}, resume_step=4)
    log.log({"step": 5, "resumed": True})
    log.finish()
    records = read_jsonl(os.path.join(tmp_path, "log.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["resumed"]


def test_fresh_run_does_not_append_to_an_old_log(tmp_path):
    for _ in range(2):
        log = RunLog(str(tmp_path), "r", {})
        log.log({"step": 1})
        log.finish()
    assert len(read_jsonl(os.path.join(tmp_path, "log.jsonl"))) == 1


def test_non_master_writes_nothing(tmp_path):
    log = RunLog(str(tmp_path / "x"), "r", {}, enabled=False)
    log.log({"step": 1})
    log.finish()
    assert not os.path.exists(tmp_path / "x")


def test_mfu():
    assert math.isclose(model_flops_utilization(1e9, 1e5, 1e15, 1), 0.1)
    assert math.isclose(model_flops_utilization(1e9, 8e5, 1e15, 8), 0.1)
    assert model_flops_utilization(1e9, 1e5, None) is None


def test_diagnosis_names_the_bottleneck():
    assert diagnose_low_mfu(0.5, 0.5, 0.5, 1024) == ""
    assert "data wait is 30%" in diagnose_low_mfu(0.2, 0.30, 0.05, 65536)
    assert "optimizer step" in diagnose_low_mfu(0.2, 0.02, 0.25, 65536)
    assert "--device-batch-size" in diagnose_low_mfu(0.2, 0.02, 0.05, 4096)
