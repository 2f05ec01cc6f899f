"""Checkpoints: atomic, checksummed save and verified load of model, per-rank state and meta.

Layout of `<checkpoint_root>/step_000123/`:
- `model.safetensors`  model weights (rank 0); no pickle, so loading runs no code
- `rank_000.pt` ...    per rank: optimizer state, data loader state, RNG states; read back
                       with torch.load(weights_only=True) (tensors and plain containers only)
- `meta.json`          step, model config, training args, loop state, world size and the size and
                       content hash of every file above; written last, so its presence means "complete"

Every rank writes into `.tmp_step_000123/`, hashing its bytes as they are written; rank 0 then
fsyncs and renames it into place. Loading checks sizes, then hashes: a file whose bytes changed
(bit rot, a bad copy, a same-size overwrite) is refused, naming the file and the step to resume
from instead. Assumes the checkpoint root is one filesystem seen by all ranks (single node, or a
shared mount across nodes).

Crash safety, at every instant of a save (a SIGKILL can land anywhere):
- a new step: the rename of the complete temp dir is the commit; before it the step is absent.
- re-saving an existing step: `step_N` -> `step_N.old`, temp -> `step_N`, drop `step_N.old`.
  Between the two renames only `step_N.old` holds the step, so readers (list_steps, step_dir)
  fall back to a complete `.old` when `step_N` is missing. Nothing is repaired on read (a reader
  may run next to a live trainer); the next save by the owning run does it (recover()).
Disk full: a save checks the free space against the bytes it will write before it starts, and a
write that still fails removes its temp dir and raises one CheckpointError that names the bytes
needed and free and the last good step.
"""

import errno
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes, save as save_safetensors_bytes

from nanochat.common import across_ranks

STEP_DIR = re.compile(r"^step_(\d{6,})$")
OLD_STEP_DIR = re.compile(r"^step_(\d{6,})\.old$")
TMP_PREFIX = ".tmp_step_"
HASH_NAME = "xxh3-128"  # measured at d12 (dev/LOG.md): ~10x blake2b's speed, save/load cost within noise
HASH_CHUNK_BYTES = 16 * 2**20
PAUSE_ENV = "NANOCHAT_CHECKPOINT_PAUSE_AT"  # tests only: stop a save at a named point so it can be killed there


class CheckpointError(RuntimeError):
    pass


def _new_hasher():
    return xxhash.xxh3_128()  # not cryptographic: it guards against corruption, not against an attacker


def _pause_point(name):
    """Test hook for the crash-safety tests: with PAUSE_ENV=name, announce and block here until killed."""
    if os.environ.get(PAUSE_ENV) == name:
        import sys
        import time
        print(f"checkpoint: paused at {name}", flush=True, file=sys.stderr)
        time.sleep(3600)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """A write-only file that hashes what passes through it: the checksum costs no re-read."""

    def __init__(self, f):
        self.f, self.hasher, self.error = f, _new_hasher(), None

    def write(self, data):
        self.hasher.update(data)
        try:
            return self.f.write(data)
        except OSError as e:  # kept: torch.save turns it into a RuntimeError that no longer says ENOSPC
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _write(path, writer):
    """writer(file) then fsync, so a rename afterwards can never expose a half-written file. Returns the hash."""
    with open(path, "wb") as f:
        hashing = _HashingFile(f)
        try:
            writer(hashing)
        except Exception:
            if hashing.error is not None:
                raise hashing.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return hashing.hasher.hexdigest()


def file_hash(path):
    hasher = _new_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def tensor_bytes(obj):
    """Bytes of every tensor in a nested dict/list/tuple: the payload torch.save or safetensors writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(model, rank_state):
    """A lower bound on one checkpoint's size, all ranks (collective): weights plus every rank's tensors.
    The files add only headers and pickled containers on top (well under 1%)."""
    return tensor_bytes(model.state_dict()) + int(across_ranks(tensor_bytes(rank_state), dist.ReduceOp.SUM))


def free_bytes(path):
    """Free bytes on the filesystem that holds path (or would: the nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _is_disk_full(exc):
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)  # safetensors and torch.save re-raise the OS error as their own type
    return "No space left on device" in text or "Disk quota exceeded" in text


def step_dir(checkpoint_root, step):
    """The directory holding `step`: `step_N`, or a complete `step_N.old` left by a crash mid re-save."""
    final = os.path.join(checkpoint_root, f"step_{step:06d}")
    old = final + ".old"
    if not os.path.exists(os.path.join(final, "meta.json")) and os.path.exists(os.path.join(old, "meta.json")):
        return old
    return final


def recover(checkpoint_root):
    """Repairs what a crash mid-save left: an orphaned `step_N.old` becomes `step_N` again; a `.old`
    next to a complete `step_N` and every temp dir are deleted. Only for the run that owns the root
    (save_checkpoint calls it on rank 0): a temp dir may be a live save of that run."""
    if not os.path.isdir(checkpoint_root):
        return
    for name in os.listdir(checkpoint_root):
        path = os.path.join(checkpoint_root, name)
        match = OLD_STEP_DIR.match(name)
        if match:
            final = path.removesuffix(".old")
            if os.path.exists(os.path.join(final, "meta.json")):
                shutil.rmtree(path)
            else:
                shutil.rmtree(final, ignore_errors=True)  # an incomplete step_N cannot come from save_checkpoint
                os.replace(path, final)
        elif name.startswith(TMP_PREFIX):
            shutil.rmtree(path)
    _fsync_dir(checkpoint_root)


def _agree(error):
    """Every rank raises the first rank's error message, or none does: a collective never sees one rank leave."""
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise CheckpointError(error)


def _disk_full_message(step, checkpoint_root, need, last_good, what_happened):
    resume = f"last good checkpoint: step {last_good}" if last_good is not None else "no earlier checkpoint"
    return (f"checkpoint step {step} not saved: no space left on device at {checkpoint_root} (needs {need:,} bytes, "
            f"{free_bytes(checkpoint_root):,} free); {what_happened}; {resume}")


def save_checkpoint(checkpoint_root, step, model, rank_state, meta, rank=0, world_size=1):
    """Collective when distributed: every rank calls it with its own rank_state dict.

    Raises CheckpointError on every rank (and leaves no partial directory) when the disk is full."""
    final = os.path.join(checkpoint_root, f"step_{step:06d}")
    tmp = os.path.join(checkpoint_root, f"{TMP_PREFIX}{step:06d}")
    need = checkpoint_bytes(model, rank_state)
    if rank == 0:
        os.makedirs(checkpoint_root, exist_ok=True)
        recover(checkpoint_root)
    _barrier()
    steps_before = list_steps(checkpoint_root)
    last_good = steps_before[-1] if steps_before else None
    short = free_bytes(checkpoint_root) < need  # cannot fit: refuse before writing a byte
    _agree(_disk_full_message(step, checkpoint_root, need, last_good, "nothing was written") if short else None)
    if rank == 0:
        os.makedirs(tmp)
    _barrier()
    error, hashes = None, {}
    try:
        name = f"rank_{rank:03d}.pt"
        hashes[name] = _write(os.path.join(tmp, name), lambda f: torch.save(rank_state, f))
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not strand them in a barrier
        error = e
    if dist.is_initialized():  # rank 0 needs every rank's hash for meta.json
        gathered = [None] * world_size
        dist.all_gather_object(gathered, hashes)
        hashes = {k: v for h in gathered for k, v in h.items()}
    if rank == 0 and error is None and len(hashes) == world_size:
        try:
            weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            hashes["model.safetensors"] = _write(os.path.join(tmp, "model.safetensors"),
                                                 lambda f: f.write(save_safetensors_bytes(weights)))
            del weights
            files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)), HASH_NAME: hashes[name]}
                     for name in sorted(hashes)}
            meta = {**meta, "step": step, "world_size": world_size, "files": files}
            _write(os.path.join(tmp, "meta.json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
            _fsync_dir(tmp)
            _pause_point("before_rename")
            if os.path.exists(final):  # re-saving a step: see the module docstring for every instant of this
                old = final + ".old"
                os.replace(final, old)
                _pause_point("between_renames")
                os.replace(tmp, final)
                _pause_point("before_drop_old")
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _fsync_dir(checkpoint_root)
        except Exception as e:  # noqa: BLE001
            error = e
    failed = across_ranks(error is not None, dist.ReduceOp.MAX)
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()  # the free space in the message is measured after the partial directory is gone
        message = None
        if error is not None:
            message = (_disk_full_message(step, checkpoint_root, need, last_good, "the partial directory was removed")
                       if _is_disk_full(error) else
                       f"checkpoint step {step} not saved: {type(error).__name__}: {error}; the partial directory was removed")
        _agree(message)
    return final


def list_steps(checkpoint_root):
    """Steps of complete checkpoints (those with meta.json, incl. an orphaned `.old`), ascending."""
    if not os.path.isdir(checkpoint_root):
        return []
    steps = set()
    for name in os.listdir(checkpoint_root):
        match = STEP_DIR.match(name) or OLD_STEP_DIR.match(name)
        if match and os.path.exists(os.path.join(checkpoint_root, name, "meta.json")):
            steps.add(int(match.group(1)))
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


def _earlier_step_advice(checkpoint_dir):
    """'resume from an earlier step: --resume-from-step N' with the newest step before this one, if any."""
    match = STEP_DIR.match(os.path.basename(checkpoint_dir)) or OLD_STEP_DIR.match(os.path.basename(checkpoint_dir))
    earlier = [s for s in list_steps(os.path.dirname(checkpoint_dir)) if match and s < int(match.group(1))]
    if earlier:
        return f"resume from an earlier step: --resume-from-step {earlier[-1]}"
    return "no earlier checkpoint to resume from: start the run again without --resume-from-step"


def load_meta(checkpoint_dir):
    """meta.json after checking every listed file exists with its recorded size (contents: verify_files)."""
    meta_path = os.path.join(checkpoint_dir, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is missing or corrupt ({e}); this checkpoint is incomplete — "
                              f"{_earlier_step_advice(checkpoint_dir)}") from None
    for name, record in meta["files"].items():
        size = record["bytes"] if isinstance(record, dict) else record  # checkpoints from before the hashes: a size
        path = os.path.join(checkpoint_dir, name)
        actual = os.path.getsize(path) if os.path.exists(path) else None
        if actual != size:
            raise CheckpointError(f"{path} is {'missing' if actual is None else f'{actual} bytes'}, meta.json says "
                                  f"{size} bytes: the checkpoint is truncated — {_earlier_step_advice(checkpoint_dir)}")
    return meta


def _verify(checkpoint_dir, meta, name, data=None):
    """None if file `name` (or its bytes `data`, already read) has the hash meta.json recorded, else the error line."""
    record = meta["files"].get(name)
    if not isinstance(record, dict) or HASH_NAME not in record:
        return None  # written before checksums existed: the size check is all there is
    if data is None:
        actual = file_hash(os.path.join(checkpoint_dir, name))
    else:
        hasher = _new_hasher()
        hasher.update(data)
        actual = hasher.hexdigest()
    if actual == record[HASH_NAME]:
        return None
    return (f"{os.path.join(checkpoint_dir, name)} is corrupt: its {HASH_NAME} hash {actual} differs from "
            f"{record[HASH_NAME]} in meta.json (same size, changed bytes) — {_earlier_step_advice(checkpoint_dir)}")


def verify_files(checkpoint_dir, names=None):
    """Checks sizes and content hashes of the named files (default: all), raising CheckpointError on the first bad one."""
    meta = load_meta(checkpoint_dir)
    for name in names if names is not None else meta["files"]:
        error = _verify(checkpoint_dir, meta, name)
        if error:
            raise CheckpointError(error)
    return meta


def load_model_weights(model, checkpoint_dir):
    """Loads model.safetensors into model after checking its hash; refuses a checkpoint of another shape."""
    meta = load_meta(checkpoint_dir)
    path = os.path.join(checkpoint_dir, "model.safetensors")
    try:
        with open(path, "rb") as f:
            data = f.read()  # read once: hashed and parsed from the same bytes
        error = _verify(checkpoint_dir, meta, "model.safetensors", data)
        if error:
            raise CheckpointError(error)
        weights = load_safetensors_bytes(data)
        del data
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
    """This rank's state after checking its hash. Collective when distributed: if any rank's file is bad,
    every rank raises the same error (no rank goes on into a collective the others never reach)."""
    meta = load_meta(checkpoint_dir)
    if meta["world_size"] != world_size:
        raise CheckpointError(f"{checkpoint_dir} was written by {meta['world_size']} ranks, this run has {world_size}: "
                              "resume with the same number of processes (optimizer state is sharded per rank)")
    name = f"rank_{rank:03d}.pt"
    _agree(_verify(checkpoint_dir, meta, name))
    return torch.load(os.path.join(checkpoint_dir, name), weights_only=True)
