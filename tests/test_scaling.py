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
    """NOTES: d8 -> 2^18, d12-16 -> 2^19, d18-26 -> 2^20; RECIPE: the same at any ratio (N/N_d12 only)."""
    assert scaling.optimal_batch_tokens(scaling.scaling_params(depth, 32768), 32768) == batch


def test_batch_exponent():
    """10x more tokens -> ~2.4x batch (before rounding)."""
    assert 10 ** scaling.BATCH_EXPONENT == pytest.approx(2.4, abs=0.05)


def test_d24_record_numbers():
    """RECIPE "Data, batch size and horizon" and "Muon WD size": d24 at the speedrun's ratio 8."""
    n = scaling.scaling_params(24, 32768)
    assert round(n / 1e5) == 7298 and round(scaling.scaling_params(12, 32768) / 1e5) == 1101  # 729.8M, 110.1M
    batch = scaling.optimal_batch_tokens(n, 32768)
    assert batch == 2**20
    assert round(scaling.training_tokens(n, scaling.SPEEDRUN_PARAM_DATA_RATIO) / batch) == 5568
    assert scaling.muon_weight_decay(n, batch, 32768) == pytest.approx(0.0597, abs=5e-5)
    assert scaling.DEFAULT_PARAM_DATA_RATIO == 12


def test_muon_weight_decay_at_the_anchor_and_at_d4():
    n12 = scaling.scaling_params(12, 32768)
    assert scaling.muon_weight_decay(n12, 2**19, 32768) == pytest.approx(0.28)
    # the d4 figure for the reference: vocab 4096, B = 2048 -> 0.367
    assert scaling.muon_weight_decay(scaling.scaling_params(4, 4096), 2048, 4096) == pytest.approx(0.367, abs=1e-3)


def test_lr_batch_scale_is_sqrt_from_2_19_up_and_held_below():
    assert scaling.lr_batch_scale(2**19) == 1.0
    assert scaling.lr_batch_scale(2**21) == 2.0 and scaling.lr_batch_scale(2**20) == math.sqrt(2)  # the record's rule
    assert scaling.lr_batch_scale(2**19 - 2**12) == scaling.lr_batch_scale(2048) == scaling.lr_batch_scale(1) == 1.0


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


def test_base_train_resolves_the_floor_and_passes_the_gate_lr_unscaled():
    from scripts.base_train import build_optimizer, parse_args, resolve_hyperparameters
    model = GPT(GPTConfig.from_depth(2, vocab_size=256, sequence_len=64, head_dim=32))
    for batch, lr_scale in ((2048, 1.0), (2**19, 1.0), (2**21, 2.0)):
        args = parse_args(["--total-batch-size", str(batch), "--device-batch-size", "32", "--max-seq-len", "64",
                           "--num-iterations", "10", "--compile", "0"])
        hp = resolve_hyperparameters(args, model, world_size=1)
        assert hp["lr_batch_scale"] == lr_scale and hp["matrix_lr"] == pytest.approx(0.02 * lr_scale)
        assert hp["gate_lr"] == 0.2  # RECIPE: unscaled
        groups = build_optimizer(model, hp, args).param_groups
        [group] = [g for g in groups if any(p is model.backout_lambda for p in g["params"])]
        assert group["lr"] == pytest.approx(0.2)


def test_default_warmup_is_the_records_from_2_19_up_and_none_below():
    from scripts.base_train import parse_args
    assert parse_args([]).warmup_steps == -1  # resolved from the batch by scaling.default_warmup_steps
    assert scaling.default_warmup_steps(2**20) == scaling.default_warmup_steps(2**19) == 40  # RECIPE
    assert scaling.default_warmup_steps(2**19 - 2**12) == scaling.default_warmup_steps(2048) == 0


def test_momentum_and_wd_schedules():
    assert scaling.muon_momentum(0) == 0.85
    assert scaling.muon_momentum(200) == pytest.approx(0.91)
    assert scaling.muon_momentum(10_000) == 0.97
    # RECIPE d24: N = 5568, warmdown from step 1949 (0.65 N): 0.97 until then, 0.90 at the end
    n = 5568
    assert scaling.muon_momentum(1948, n) == 0.97
    assert scaling.muon_momentum(n - 3619 // 2, n) == pytest.approx(0.935, abs=1e-3)
    assert scaling.muon_momentum(n, n) == pytest.approx(0.90)
    # a 300-step run: ours falls from the ramp to 0.90; the reference's order (ramp first) ends at 0.94 (issue 26)
    assert scaling.muon_momentum(300, 300) == pytest.approx(0.90)
    assert scaling.muon_momentum(300, 300, ramp_first=True) == pytest.approx(0.94)
    assert scaling.muon_momentum(n, n, ramp_first=True) == scaling.muon_momentum(n, n)  # the same on long runs
    # Muon WD: a cosine from 1 to 0
    assert scaling.weight_decay_multiplier(0, 100) == 1.0
    assert scaling.weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert scaling.weight_decay_multiplier(25, 100) == pytest.approx(0.5 * (1 + 2 ** -0.5))
    assert scaling.weight_decay_multiplier(100, 100) == pytest.approx(0.0, abs=1e-12)


def test_scaling_does_not_import_torch():
    import ast
    tree = ast.parse(open(scaling.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name and name.split(".")[0] == "torch" for name in imported)
    assert math.isclose(scaling.training_tokens(100, 12), 1200)


def test_anchor_has_the_runs_own_shape():
    """Narrowed models anchor on the d12 of their own aspect ratio and head dim (the reference's rule): at aspect 32 /
    head dim 64 the d4 Muon WD is 0.30 (was 1.18 when anchored on the default-width d12), d6 0.12 (was 0.45)."""
    for depth, want, old in ((4, 0.304, 1.176), (6, 0.116, 0.448)):
        n = scaling.scaling_params(depth, 4096, 32, 64)
        assert scaling.muon_weight_decay(n, 2048, 4096, aspect_ratio=32, head_dim=64) == pytest.approx(want, abs=1e-3)
        assert scaling.muon_weight_decay(n, 2048, 4096) == pytest.approx(old, abs=1e-3)
    n12_narrow = scaling.scaling_params(12, 32768, 32, 64)
    assert scaling.optimal_batch_tokens(n12_narrow, 32768, aspect_ratio=32, head_dim=64) == 2**19  # its own anchor
    assert scaling.optimal_batch_tokens(n12_narrow, 32768) == 2**18  # the default-width anchor would halve it
