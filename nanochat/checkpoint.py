"""Checkpoints: atomic save and safe load of model, per-rank state and meta.

Layout of `<checkpoint_root>/step_000123/`:
- `model.safetensors`  model weights (rank 0); no pickle, so loading runs no code
- `rank_000.pt` ...    per rank: optimizer state, data loader state, RNG states; read back
                       with torch.load(weights_only=True) (tensors and plain containers only)
- `meta.json`          step, model config, training args, loop state, world size and the size
                       of every file above; written last, so its presence means "complete"

Every rank writes into `.tmp_step_000123/`; after a barrier rank 0 fsyncs and renames it into
place. A crash at any point leaves the previous checkpoint untouched and at worst a stale
`.tmp_*` directory, which is ignored and cleaned up by the next save. Assumes the checkpoint
root is one filesystem seen by all ranks (single node, or a shared mount across nodes).
"""

import glob
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    pass


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path, writer):
    """writer(path) then fsync, so a rename afterwards can never expose a half-written file."""
    writer(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def step_dir(checkpoint_root, step):
    return os.path.join(checkpoint_root, f"step_{step:06d}")


def save_checkpoint(checkpoint_root, step, model, rank_state, meta, rank=0, world_size=1):
    """Collective when distributed: every rank calls it with its own rank_state dict."""
    final = step_dir(checkpoint_root, step)
    tmp = os.path.join(checkpoint_root, f".tmp_step_{step:06d}")
    if rank == 0:
        os.makedirs(checkpoint_root, exist_ok=True)
        for stale in glob.glob(os.path.join(checkpoint_root, ".tmp_step_*")):
            shutil.rmtree(stale)
        os.makedirs(tmp)
    _barrier()
    _write(os.path.join(tmp, f"rank_{rank:03d}.pt"), lambda p: torch.save(rank_state, p))
    _barrier()
    if rank == 0:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        _write(os.path.join(tmp, "model.safetensors"), lambda p: save_file(weights, p))
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        meta = {**meta, "step": step, "world_size": world_size, "files": files}
        _write(os.path.join(tmp, "meta.json"), lambda p: _write_json(p, meta))
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving a step: move the old one aside first, drop it after
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(checkpoint_root)
    _barrier()
    return final


def list_steps(checkpoint_root):
    """Steps of complete checkpoints (those with meta.json), ascending."""
    if not os.path.isdir(checkpoint_root):
        return []
    steps = []
    for name in os.listdir(checkpoint_root):
        match = STEP_DIR.match(name)
        if match and os.path.exists(os.path.join(checkpoint_root, name, "meta.json")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def resolve_step(checkpoint_root, step):
    """'latest' or an int -> an existing step, or a CheckpointError that lists what exists."""
    steps = list_steps(checkpoint_root)
    if not steps:
        raise CheckpointError(f"no complete checkpoint under {checkpoint_root}")
    if step == "latest":
        return steps[-1]
    if int(step) not in steps:
        raise CheckpointError(f"no checkpoint for step {step} under {checkpoint_root}; available: {steps}")
    return int(step)


def load_meta(checkpoint_dir):
    """meta.json after checking every listed file exists with its recorded size."""
    meta_path = os.path.join(checkpoint_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is missing or corrupt ({e}); this checkpoint is incomplete — "
                              "resume from an earlier step") from None
    for name, size in meta["files"].items():
        path = os.path.join(checkpoint_dir, name)
        actual = os.path.getsize(path) if os.path.exists(path) else None
        if actual != size:
            raise CheckpointError(f"{path} is {'missing' if actual is None else f'{actual} bytes'}, meta.json says "
                                  f"{size} bytes: the checkpoint is truncated — resume from an earlier step")
    return meta


def load_model_weights(model, checkpoint_dir):
    """Loads model.safetensors into model, refusing a checkpoint of another shape with the differences."""
    path = os.path.join(checkpoint_dir, "model.safetensors")
    try:
        weights = load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own.keys() & weights.keys() if weights[k].shape != own[k].shape]
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if mismatched or missing or unexpected:
        details = "; ".join(mismatched[:3] + [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {unexpected[:3]}"] * bool(unexpected))
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not fit this model ({details}); "
                              "build the model with the checkpoint's config (its meta.json 'model_config')")
    model.load_state_dict(weights)


def load_rank_state(checkpoint_dir, rank, world_size):
    meta = load_meta(checkpoint_dir)
    if meta["world_size"] != world_size:
        raise CheckpointError(f"{checkpoint_dir} was written by {meta['world_size']} ranks, this run has {world_size}: "
                              "resume with the same number of processes (optimizer state is sharded per rank)")
    return torch.load(os.path.join(checkpoint_dir, f"rank_{rank:03d}.pt"), weights_only=True)
