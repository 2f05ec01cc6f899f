"""base_train.warm_up: after it, the first real train step and the first evaluation compile nothing.

Multi-node runs depend on it: a rank that compiles at step 0 while the others wait in a
collective can trip the watchdog. Dynamo's guards decide what recompiles, and they are the same
for every backend, so the model is compiled with backend="eager" (no kernel builds, seconds).
The batches come from the real DataLoader and the evaluation runs through evaluate_bpb, so the
calls are exactly the training loop's.
"""

import pytest
import torch

from nanochat.dataloader import DataLoader
from nanochat.fp8 import convert_to_fp8, disable_fp8
from nanochat.loss_eval import evaluate_bpb
from nanochat.loss_scale import DynamicLossScaler
from scripts import base_train

# depth 1 at width 128: the smallest model whose linears convert to fp8
TINY = ["--depth", "1", "--aspect-ratio", "128", "--head-dim", "64", "--max-seq-len", "64", "--device-batch-size", "4",
        "--compile", "0", "--num-iterations", "2", "--total-batch-size", "256"]


@pytest.mark.parametrize("fp8", [False, True])
def test_first_train_step_and_eval_after_warm_up_do_not_recompile(fp8, tokenizer, corpus_dir):
    # --compile 0 keeps the optimizer eager (its compiled update functions are not what this tests)
    args = base_train.parse_args(TINY)
    device = torch.device("cpu")
    model = base_train.build_model(args, tokenizer.vocab_size, device)
    hp = base_train.resolve_hyperparameters(args, model, 1)
    optimizer = base_train.build_optimizer(model, hp, args)
    scaler = DynamicLossScaler(enabled=False)
    if fp8:
        assert convert_to_fp8(model) == 6  # eval then runs a second (plain Linear) graph: warm_up must compile it too
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False, backend="eager")
    base_train.warm_up(compiled, model, optimizer, args, device, scaler)
    token_bytes = tokenizer.token_bytes()
    loader_args = dict(tokenizer=tokenizer, batch_size=args.device_batch_size, seq_len=args.max_seq_len,
                       data_dir=corpus_dir, device=device, buffer_size=8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        with DataLoader(split="train", **loader_args) as train_batches:
            loss, *_ = base_train.train_step(model, compiled, optimizer, scaler, train_batches, hp["grad_accum_steps"])
        with torch.no_grad(), disable_fp8(model), DataLoader(split="val", packer="greedy", **loader_args) as val:
            bpb = evaluate_bpb(compiled, val.one_pass(), 2, token_bytes)
    assert torch.isfinite(loss) and bpb > 0
