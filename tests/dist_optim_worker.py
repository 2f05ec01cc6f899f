"""Trains a tiny GPT for a few steps on a fixed global batch with MuonAdamW; each rank saves its parameters.

Run by tests/test_optim.py under `torchrun --standalone --nproc_per_node=2` (gloo, CPU, fp32):
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_optim_worker.py OUT_DIR
The test also imports `train` and runs it as a single process on the same global batch: the
optimizer's gradient averaging must make both runs end with the same parameters.
"""

import sys

import torch

from nanochat.common import cleanup_dist, init_dist
from nanochat.gpt import GPT, GPTConfig

STEPS = 10
GLOBAL_ROWS = 8      # sequences per optimizer step, split evenly over ranks
MICRO_STEPS = 2      # gradient accumulation on every rank, as in the training loop
SEQ_LEN = 32


def build_model(compute_dtype=torch.float32):
    # depth 3, not 2: at depth 2 backout's mid-depth block (L//2) is the last one, and x - lambda_b * x
    # is invariant under the final RMSNorm, so lambda_b's gradient would be pure rounding noise
    config = GPTConfig.from_depth(3, vocab_size=256, sequence_len=SEQ_LEN, head_dim=32)
    model = GPT.build(config, "cpu", seed=0, compute_dtype=compute_dtype)
    # init zeroes the output projections, which makes the scalars' gradients pure rounding noise
    # (~1e-10) at step 0, and Adam (eps 1e-10) turns noise into full-size steps of random sign:
    # no two summation orders would agree. Small random projections give every gradient signal.
    with torch.no_grad():
        for block in model.blocks:
            for weight in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                weight.normal_(std=0.02)
    return model


def global_batch():
    """The same 8 sequences every step: the model memorises them, so the loss must fall."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 256, (GLOBAL_ROWS, SEQ_LEN + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def train(rank=0, world_size=1, steps=STEPS):
    """Returns (model, optimizer, per-step losses on this rank) after `steps` optimizer steps."""
    model = build_model()
    optimizer = model.setup_optimizer(weight_decay=0.1, compiled=False)
    optimizer.orth_dtype = torch.float32  # explicit: equality at fp32 tolerance is the point
    # plain decoupled decay here: the cautious mask (update * p > 0) is a step function, so a 1e-7
    # summation-order difference in an update near 0 flips it and moves p by lr * wd * p (~1e-4);
    # the mask itself is tested element-wise in one process
    for group in optimizer.param_groups:
        group["cautious"] = False
    x, y = global_batch()
    rows = GLOBAL_ROWS // world_size
    x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
    losses = []
    for step in range(steps):
        total = 0.0
        for xm, ym in zip(x.chunk(MICRO_STEPS), y.chunk(MICRO_STEPS)):
            loss = model(xm, ym) / MICRO_STEPS
            loss.backward()
            total += loss.item()
        # a schedule that moves every hyperparameter every step, as the training loop does
        optimizer.update_hparams(lr_multiplier=1.0 - step / (2 * steps), weight_decay_multiplier=1.0 - step / steps,
                                 muon_momentum=0.85 + 0.01 * step)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(total)
    return model, optimizer, losses


def main(out_dir):
    info = init_dist("cpu")
    model, optimizer, losses = train(info.rank, info.world_size)
    params = {name: p.detach() for name, p in model.named_parameters()}
    wte_state_shape = list(optimizer.state[model.wte.weight]["exp_avg"].shape)  # sharded: half the rows
    torch.save({"params": params, "losses": losses, "wte_state_shape": wte_state_shape}, f"{out_dir}/rank{info.rank}.pt")
    cleanup_dist()


if __name__ == "__main__":
    main(sys.argv[1])
