"""torchrun worker (2 ranks, gloo): an inf gradient on rank 1 only must make BOTH ranks skip that step.

Run by tests/test_base_train.py. Each rank trains the same tiny GPT on its own batch with fp16-style
loss scaling; at step 1 rank 1 alone gets an inf in one gradient. Prints the skip pattern and
whether parameters are identical across ranks afterwards.
"""

import torch
import torch.distributed as dist

from nanochat.common import cleanup_dist, init_dist
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_scale import DynamicLossScaler

info = init_dist("cpu")
model = GPT.build(GPTConfig.from_depth(2, vocab_size=256, sequence_len=32, head_dim=32), "cpu", seed=0)
optimizer = model.setup_optimizer()
scaler = DynamicLossScaler(init_scale=2.0**10)
gen = torch.Generator().manual_seed(100 + info.rank)  # each rank its own data
skipped = []
for step in range(3):
    idx = torch.randint(0, 256, (2, 33), generator=gen)
    scaler.scale_loss(model(idx[:, :-1], idx[:, 1:])).backward()
    if step == 1 and info.rank == 1:
        model.blocks[0].mlp.c_fc.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    found_inf = scaler.unscale_and_check(model.parameters())
    if not found_inf:
        optimizer.step()
    scaler.update(found_inf)
    model.zero_grad(set_to_none=True)
    if found_inf:
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "a skipped step changed parameters"
    skipped.append(found_inf)

flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(info.world_size)]
dist.all_gather(gathered, flat)
print(f"rank {info.rank} skipped={skipped} equal_across_ranks={all(torch.equal(gathered[0], g) for g in gathered)} "
      f"scale={scaler.scale}", flush=True)
cleanup_dist()
