"""torchrun worker (2 ranks, gloo): a NaN loss on rank 1 alone must stop BOTH ranks at the same step, weights untouched.

Run by tests/test_run_guards.py. Each rank trains the same tiny GPT through base_train.train_step (the
loop's own step); at step 2 rank 1's forward returns NaN. Prints, per rank, the step and message of the
TrainingDiverged it got and whether its parameters were unchanged by that step.
"""

import torch

from nanochat.common import cleanup_dist, init_dist
from nanochat.gpt import GPT, GPTConfig
from nanochat.guards import TrainingDiverged
from nanochat.loss_scale import DynamicLossScaler
from scripts.base_train import train_step

info = init_dist("cpu")
model = GPT.build(GPTConfig.from_depth(2, vocab_size=256, sequence_len=32, head_dim=32), "cpu", seed=0)
optimizer = model.setup_optimizer(compiled=False)
scaler = DynamicLossScaler(enabled=False)
gen = torch.Generator().manual_seed(100 + info.rank)
step = 0


def batches():
    while True:
        idx = torch.randint(0, 256, (2, 33), generator=gen)
        yield idx[:, :-1], idx[:, 1:]


def forward(x, y):
    loss = model(x, y)
    return loss * float("nan") if step == 2 and info.rank == 1 else loss


data = batches()
for step in range(4):
    before = [p.detach().clone() for p in model.parameters()]
    try:
        train_step(model, forward, optimizer, scaler, data, grad_accum=2)
    except TrainingDiverged as e:
        unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        print(f"rank {info.rank} diverged at step {step}: {e} | unchanged={unchanged}", flush=True)
        break
else:
    print(f"rank {info.rank} never diverged", flush=True)
cleanup_dist()
