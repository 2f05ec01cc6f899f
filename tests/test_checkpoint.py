"""checkpoint.py: round trip, atomicity under a crash mid-save, and clear refusals of bad checkpoints."""

import json
import os

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.gpt import GPT, GPTConfig


def tiny_model(depth=2, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(depth, vocab_size=128, sequence_len=16, head_dim=32))
    model.init_weights()
    return model


def save(root, step, model, extra=0):
    rank_state = {"optimizer": {"state": {0: {"m": torch.full((3,), float(extra))}}}, "loader": {"pos": [1, 2]},
                  "rng": torch.get_rng_state()}
    return ckpt.save_checkpoint(str(root), step, model, rank_state, {"model_config": model.config.to_dict()})


def test_round_trip(tmp_path):
    model = tiny_model()
    save(tmp_path, 5, model, extra=7)
    other = tiny_model(seed=1)
    d = ckpt.step_dir(str(tmp_path), ckpt.resolve_step(str(tmp_path), "latest"))
    ckpt.load_model_weights(other, d)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    state = ckpt.load_rank_state(d, rank=0, world_size=1)
    assert state["loader"] == {"pos": [1, 2]} and torch.equal(state["optimizer"]["state"][0]["m"], torch.full((3,), 7.0))
    meta = ckpt.load_meta(d)
    assert meta["step"] == 5 and meta["model_config"]["n_layer"] == 2


def test_latest_and_listing(tmp_path):
    model = tiny_model()
    for step in (10, 2, 30):
        save(tmp_path, step, model)
    assert ckpt.list_steps(str(tmp_path)) == [2, 10, 30]
    assert ckpt.resolve_step(str(tmp_path), "latest") == 30
    with pytest.raises(ckpt.CheckpointError, match=r"available: \[2, 10, 30\]"):
        ckpt.resolve_step(str(tmp_path), 7)


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model = tiny_model()
    save(tmp_path, 1, model, extra=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError):
        save(tmp_path, 2, model, extra=2)
    monkeypatch.undo()
    assert ckpt.resolve_step(str(tmp_path), "latest") == 1  # the half-written step 2 is invisible
    state = ckpt.load_rank_state(ckpt.step_dir(str(tmp_path), 1), 0, 1)
    assert state["optimizer"]["state"][0]["m"][0] == 1.0
    save(tmp_path, 2, model)  # the next save cleans the stale temp dir
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_resave_same_step_replaces(tmp_path):
    model = tiny_model()
    save(tmp_path, 3, model, extra=1)
    save(tmp_path, 3, model, extra=9)
    state = ckpt.load_rank_state(ckpt.step_dir(str(tmp_path), 3), 0, 1)
    assert state["optimizer"]["state"][0]["m"][0] == 9.0
    assert os.listdir(tmp_path) == ["step_000003"]


def test_truncated_file_is_refused(tmp_path):
    d = save(tmp_path, 4, tiny_model())
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_meta(d)


def test_other_shape_is_refused(tmp_path):
    d = save(tmp_path, 4, tiny_model(depth=2))
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        ckpt.load_model_weights(tiny_model(depth=3), d)


def test_world_size_mismatch_is_refused(tmp_path):
    d = save(tmp_path, 4, tiny_model())
    with pytest.raises(ckpt.CheckpointError, match="same number of processes"):
        ckpt.load_rank_state(d, 0, 2)


def test_rank_state_loads_without_pickle(tmp_path):
    """A rank file holding an arbitrary Python object is refused by weights_only loading."""
    d = save(tmp_path, 4, tiny_model())
    torch.save({"evil": object()}, os.path.join(d, "rank_000.pt"))
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta["files"]["rank_000.pt"] = os.path.getsize(os.path.join(d, "rank_000.pt"))
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    with pytest.raises(Exception, match="[Ww]eights only"):
        ckpt.load_rank_state(d, 0, 1)
