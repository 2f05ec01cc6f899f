"""Shared by the data loader and mixture tests and their torchrun workers: batch taking and comparison, and
the two-rank exact-resume check both run."""

import json
import os

import torch


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
