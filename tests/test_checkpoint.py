"""checkpoint.py: round trip, crash safety under SIGKILL, checksums, disk full, and clear refusals of bad checkpoints."""

import json
import os
import signal
import sys

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.gpt import GPT, GPTConfig


def tiny_model(depth=2, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(depth, vocab_size=128, sequence_len=16, head_dim=32))
    model.init_weights()
    return model


def make_rank_state(extra=0):
    return {"optimizer": {"state": {0: {"m": torch.full((3,), float(extra))}}}, "loader": {"pos": [1, 2]},
            "rng": torch.get_rng_state()}


def save(root, step, model, extra=0):
    return ckpt.save_checkpoint(str(root), step, model, make_rank_state(extra), {"model_config": model.config.to_dict()})


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


def test_failed_save_keeps_previous_and_removes_partial(tmp_path, monkeypatch):
    model = tiny_model()
    save(tmp_path, 1, model, extra=1)

    def crash(*args, **kwargs):
        raise ValueError("serializer broke")
    monkeypatch.setattr(ckpt, "save_safetensors_bytes", crash)
    with pytest.raises(ckpt.CheckpointError, match="step 2 not saved: ValueError: serializer broke; the partial directory was removed"):
        save(tmp_path, 2, model, extra=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["step_000001"]
    assert ckpt.resolve_step(str(tmp_path), "latest") == 1
    state = ckpt.load_rank_state(ckpt.step_dir(str(tmp_path), 1), 0, 1)
    assert state["optimizer"]["state"][0]["m"][0] == 1.0


def test_stale_temp_dir_is_ignored_and_cleaned_by_the_next_save(tmp_path):
    model = tiny_model()
    save(tmp_path, 1, model)
    os.makedirs(tmp_path / ".tmp_step_000002")  # what a SIGKILL mid-write leaves
    assert ckpt.list_steps(str(tmp_path)) == [1]
    save(tmp_path, 3, model)
    assert sorted(os.listdir(tmp_path)) == ["step_000001", "step_000003"]


def overwrite_middle(path, n_bytes=64):
    """Same size, different bytes: what the size check cannot see."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        old = f.read(n_bytes)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
    assert os.path.getsize(path) == size


def test_meta_records_a_hash_of_every_file(tmp_path):
    d = save(tmp_path, 2, tiny_model())
    files = json.load(open(os.path.join(d, "meta.json")))["files"]
    assert sorted(files) == ["model.safetensors", "rank_000.pt"]
    for name, record in files.items():  # hashed while writing == hashed from disk
        assert record[ckpt.HASH_NAME] == ckpt.file_hash(os.path.join(d, name))
        assert record["bytes"] == os.path.getsize(os.path.join(d, name))


@pytest.mark.parametrize("name", ["rank_000.pt", "model.safetensors"])
def test_same_size_corruption_is_refused_naming_file_and_earlier_step(tmp_path, name):
    model = tiny_model()
    save(tmp_path, 2, model)
    d = save(tmp_path, 4, model)
    overwrite_middle(os.path.join(d, name))
    ckpt.load_meta(d)  # sizes still match: only the contents give it away
    with pytest.raises(ckpt.CheckpointError) as e:
        if name == "model.safetensors":
            ckpt.load_model_weights(tiny_model(), d)
        else:
            ckpt.load_rank_state(d, 0, 1)
    message = str(e.value)
    assert "\n" not in message and os.path.join(d, name) in message and "corrupt" in message
    assert message.endswith("resume from an earlier step: --resume-from-step 2")
    with pytest.raises(ckpt.CheckpointError, match=name):
        ckpt.verify_files(d)
    ckpt.verify_files(ckpt.step_dir(str(tmp_path), 2))  # the earlier one is fine


def test_corruption_of_the_only_checkpoint_says_to_start_over(tmp_path):
    d = save(tmp_path, 2, tiny_model())
    overwrite_middle(os.path.join(d, "rank_000.pt"))
    with pytest.raises(ckpt.CheckpointError, match="no earlier checkpoint to resume from"):
        ckpt.load_rank_state(d, 0, 1)


def test_checkpoint_without_hashes_still_loads(tmp_path):
    """meta.json from before the checksums ({name: size}) loads on the size check alone."""
    model = tiny_model()
    d = save(tmp_path, 2, model)
    meta = json.load(open(os.path.join(d, "meta.json")))
    meta["files"] = {name: record["bytes"] for name, record in meta["files"].items()}
    json.dump(meta, open(os.path.join(d, "meta.json"), "w"))
    ckpt.load_model_weights(tiny_model(seed=1), d)
    assert ckpt.load_rank_state(d, 0, 1)["loader"] == {"pos": [1, 2]}


# --- disk full ----------------------------------------------------------------

def test_disk_full_before_writing_is_refused_with_bytes_and_last_good_step(tmp_path, monkeypatch):
    model = tiny_model()
    save(tmp_path, 2, model)
    need = ckpt.checkpoint_bytes(model, make_rank_state())
    assert need == sum(p.numel() * 4 for p in model.state_dict().values()) + 3 * 4 + torch.get_rng_state().numel()
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: shutil_usage(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(ckpt.CheckpointError) as e:
        save(tmp_path, 4, model)
    message = str(e.value)
    assert f"needs {need:,} bytes, 1,000 free" in message and "nothing was written" in message
    assert message.endswith("last good checkpoint: step 2")
    assert os.listdir(tmp_path) == ["step_000002"]


def shutil_usage(total, used, free):
    import shutil
    return shutil._ntuple_diskusage(total, used, free)


def test_disk_full_while_writing_removes_the_partial_directory(tmp_path, monkeypatch):
    """A write that hits ENOSPC (the free-space check passed: another process filled the disk meanwhile)."""
    model = tiny_model()
    save(tmp_path, 2, model)

    class FillingFile:  # a file on a filesystem with 4 KiB left
        def __init__(self, f):
            self.f, self.left = f, 4096

        def write(self, data):
            if len(data) > self.left:
                raise OSError(28, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(ckpt, "open", lambda path, mode="r": FillingFile(open(path, mode)), raising=False)
    with pytest.raises(ckpt.CheckpointError) as e:
        save(tmp_path, 4, model)
    message = str(e.value)
    assert message.startswith(f"checkpoint step 4 not saved: no space left on device at {tmp_path} (needs ")
    assert "the partial directory was removed; last good checkpoint: step 2" in message
    assert os.listdir(tmp_path) == ["step_000002"]


def test_resave_same_step_replaces(tmp_path):
    model = tiny_model()
    save(tmp_path, 3, model, extra=1)
    save(tmp_path, 3, model, extra=9)
    state = ckpt.load_rank_state(ckpt.step_dir(str(tmp_path), 3), 0, 1)
    assert state["optimizer"]["state"][0]["m"][0] == 9.0
    assert os.listdir(tmp_path) == ["step_000003"]


def start_paused_resave(root, point, model):
    """A real process (forked: no second torch import) re-saving step 3 that stops at `point`; returns its pid."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: announce the pause on the pipe, then wait there to be killed
        try:
            os.close(read_end)
            os.dup2(write_end, 2)
            sys.stderr = os.fdopen(2, "w")
            os.environ[ckpt.PAUSE_ENV] = point
            save(root, 3, model, extra=9)
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end) as announcements:
        assert f"paused at {point}" in announcements.readline()
    return pid


@pytest.mark.parametrize("point,survivor", [("before_rename", 1.0), ("between_renames", 1.0), ("before_drop_old", 9.0)])
def test_resave_killed_at_any_point_leaves_a_loadable_step(tmp_path, point, survivor):
    """A real process re-saving step 3 is SIGKILLed at each point of the swap; step 3 still loads (old or new
    contents, never neither), the model loads, and the next save leaves no .old or temp dir behind."""
    model = tiny_model()
    save(tmp_path, 1, model, extra=1)
    save(tmp_path, 3, model, extra=1)
    pid = start_paused_resave(tmp_path, point, model)
    os.kill(pid, signal.SIGKILL)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL  # killed by the signal, not finished
    if point == "between_renames":  # the dangerous instant: no step_000003, only its .old
        assert "step_000003" not in os.listdir(tmp_path) and "step_000003.old" in os.listdir(tmp_path)
    assert ckpt.list_steps(str(tmp_path)) == [1, 3]
    d = ckpt.step_dir(str(tmp_path), ckpt.resolve_step(str(tmp_path), "latest"))
    assert ckpt.load_rank_state(d, 0, 1)["optimizer"]["state"][0]["m"][0] == survivor
    ckpt.load_model_weights(tiny_model(seed=1), d)
    save(tmp_path, 5, model)  # the owner's next save repairs the directory
    assert sorted(os.listdir(tmp_path)) == ["step_000001", "step_000003", "step_000005"]
    assert ckpt.load_rank_state(ckpt.step_dir(str(tmp_path), 3), 0, 1)["optimizer"]["state"][0]["m"][0] == survivor


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
