"""Shared by the data loader and mixture tests and their torchrun workers: batch taking and comparison, and
the two-rank exact-resume check both run."""

import json
import os
import subprocess
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def take_batches(loader, n):
    return [tuple(t.clone() for t in next(loader)) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for i, ((xa, ya), (xb, yb)) in enumerate(zip(a, b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb), f"batch {i} differs"


def check_two_rank_resume(make_loader, n_before, n_after, out_dir, rank):
    """Under an initialised process group: take n_before batches, rank 0 writes the all-ranks state, then a
    fresh loader resumed from it must yield the same n_after batches as the uninterrupted one; ranks must
    read different data. Writes rank<R>.ok for the test to find."""
    import torch.distributed as dist
    loader = make_loader()
    take_batches(loader, n_before)
    state = loader.state_dict_all_ranks()
    state_path = os.path.join(out_dir, "loader_state.json")
    if rank == 0:
        with open(state_path, "w") as f:
            json.dump(state, f)
    reference = take_batches(loader, n_after)  # the same loader, uninterrupted
    loader.close()
    dist.barrier()
    firsts = [None, None]
    dist.all_gather_object(firsts, reference[0][0])
    assert not torch.equal(firsts[0], firsts[1]), "ranks must read different data"
    with open(state_path) as f:
        saved = json.load(f)
    resumed = make_loader()
    resumed.load_state_dict(saved)
    assert_same_batches(take_batches(resumed, n_after), reference)
    resumed.close()
    with open(os.path.join(out_dir, f"rank{rank}.ok"), "w") as f:
        f.write("resumed exactly")


def run_two_rank_resume(worker_file, worker_args, out_dir):
    """Runs worker_file's __main__ on two gloo ranks under torchrun; both must report an exact resume."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(worker_file), *worker_args, str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        with open(os.path.join(out_dir, f"rank{rank}.ok")) as f:
            assert f.read() == "resumed exactly"
