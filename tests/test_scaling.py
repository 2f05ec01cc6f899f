"""scaling.py against the tables in shared NOTES.md and against the real model's counts."""

import math

import pytest
import torch

from nanochat import scaling
from nanochat.gpt import GPT, GPTConfig


@pytest.mark.parametrize("depth", [1, 4, 8, 12, 20, 24, 26])
def test_scaling_params_match_the_model(depth):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size=32768))
    assert scaling.scaling_params(depth, 32768) == model.num_scaling_params()


@pytest.mark.parametrize("depth,width", [(12, 768), (20, 1280), (24, 1536), (26, 1664)])
def test_widths(depth, width):
    assert scaling.model_shape(depth) == (width, width // 128)


@pytest.mark.parametrize("depth,batch", [(8, 2**18), (12, 2**19), (14, 2**19), (16, 2**19), (18, 2**20), (20, 2**20), (24, 2**20), (26, 2**20)])
def test_batch_table(depth, batch):
    """NOTES: d8 -> 2^18, d12-16 -> 2^19, d18-26 -> 2^20 at the compute-optimal horizon."""
    tokens = scaling.training_tokens(scaling.scaling_params(depth, 32768))
    assert scaling.optimal_batch_tokens(tokens, 32768) == batch


def test_batch_exponent():
    """10x more tokens -> ~2.4x batch (before rounding)."""
    assert 10 ** scaling.BATCH_EXPONENT == pytest.approx(2.4, abs=0.05)


@pytest.mark.parametrize("depth,measured", [(8, 0.40), (12, 0.22), (16, 0.10), (20, 0.08)])
def test_weight_decay_table(depth, measured):
    """The 1/width^2 law is exact at the d12 anchor and lands within 25% of the swept optima elsewhere."""
    width, _ = scaling.model_shape(depth)
    wd = scaling.weight_decay_for_width(width)
    assert wd == pytest.approx(measured, rel=0.25)
    if depth == 12:
        assert wd == 0.22


def test_lr_batch_scale():
    assert scaling.lr_batch_scale(2**19) == 1.0
    assert scaling.lr_batch_scale(2**21) == 2.0


def test_lr_schedule_shape():
    n = 1000
    lrm = [scaling.lr_multiplier(s, n, warmup_steps=40) for s in range(n + 1)]
    assert lrm[0] == 1 / 40 and lrm[39] == 1.0
    assert all(m == 1.0 for m in lrm[40:351])      # constant until 35% of training
    assert lrm[-1] == pytest.approx(0.05)           # warmdown over the last 65% to 5%
    assert all(a >= b for a, b in zip(lrm[350:], lrm[351:]))
    assert lrm[675] == pytest.approx(1 - 0.5 * 0.95)


def test_lr_schedule_short_run_has_no_jump():
    # 50 steps: the 40-step warmup overlaps the warmdown (starts at 17.5); the peak is where they cross
    lrm = [scaling.lr_multiplier(s, 50, warmup_steps=40) for s in range(50)]
    assert max(lrm) < 1.0
    assert max(abs(a - b) for a, b in zip(lrm, lrm[1:])) < 0.05
    assert lrm[-1] == pytest.approx(0.05 + 0.95 / 32.5, rel=1e-6)


def test_default_lr_schedule_has_no_warmup():
    """Full LR from the first step (the March reference's schedule: the 40-step warmup cost 0.62 nats at
    step 50 of a d4 x 200-step run, dev/LOG.md 2026-11-30); the flag still turns a warmup on."""
    assert scaling.lr_multiplier(0, 200) == 1.0
    assert all(scaling.lr_multiplier(s, 200) == 1.0 for s in range(70))  # flat until the warmdown at 35%
    assert scaling.lr_multiplier(0, 200, warmup_steps=40) == 1 / 40


def test_base_train_defaults_to_no_warmup():
    from scripts.base_train import parse_args
    assert parse_args([]).warmup_steps == 0


def test_momentum_and_wd_schedules():
    assert scaling.muon_momentum(0) == 0.85
    assert scaling.muon_momentum(200) == pytest.approx(0.91)
    assert scaling.muon_momentum(10_000) == 0.97
    assert scaling.weight_decay_multiplier(0, 100) == 1.0
    assert scaling.weight_decay_multiplier(50, 100) == 0.5


def test_scaling_does_not_import_torch():
    import ast
    tree = ast.parse(open(scaling.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.split(".")[0] == "torch" for name in imported)
    assert math.isclose(scaling.training_tokens(100, 10.5), 1050)
