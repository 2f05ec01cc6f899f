"""torchrun worker (2 ranks, gloo): an inf gradient on rank 1 only must make BOTH ranks skip that step.

Run by tests/test_base_train.py. Each rank trains the same tiny GPT on its own batches through
base_train.train_step (the loop's own step: accumulation, loss scaling, the all-reduced inf check, the
optimizer) with fp16-style loss scaling; at step 1 a gradient hook puts an inf into one gradient on rank 1
alone, during the backward inside train_step. Prints the skip pattern and whether parameters are identical
across ranks afterwards.
"""

import torch
import torch.distributed as dist

from nanochat.common import cleanup_dist, init_dist
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_scale import DynamicLossScaler
from scripts.base_train import train_step

info = init_dist("cpu")
model = GPT.build(GPTConfig.from_depth(2, vocab_size=256, sequence_len=32, head_dim=32), "cpu", seed=0)
# eager updates: the skip is decided before them, and two ranks compiling the updates cost ~55 s cold
optimizer = model.setup_optimizer(compiled=False)
scaler = DynamicLossScaler(init_scale=2.0**10)
gen = torch.Generator().manual_seed(100 + info.rank)  # each rank its own data


def batches():
    while True:
        idx = torch.randint(0, 256, (2, 33), generator=gen)
        yield idx[:, :-1], idx[:, 1:]


step = 0


def poison(grad):
    """Rank 1, step 1: one inf in the MLP's gradient, as an fp16 overflow would leave it."""
    if step == 1 and info.rank == 1:
        grad = grad.clone()
        grad[0, 0] = float("inf")
    return grad


model.blocks[0].mlp.c_fc.weight.register_hook(poison)
data = batches()
skipped = []
for step in range(3):
    before = [p.detach().clone() for p in model.parameters()]
    _, _, _, found_inf, _ = train_step(model, model, optimizer, scaler, data, grad_accum=2)
    if found_inf:
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "a skipped step changed parameters"
    else:
        assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "a taken step changed nothing"
    skipped.append(found_inf)

flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(info.world_size)]
dist.all_gather(gathered, flat)
print(f"rank {info.rank} skipped={skipped} equal_across_ranks={all(torch.equal(gathered[0], g) for g in gathered)} "
      f"scale={scaler.scale}", flush=True)
cleanup_dist()
