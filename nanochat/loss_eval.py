"""Bits per byte: the tokenizer-independent validation loss.

Mean cross-entropy per token cannot compare runs with different vocabularies (a bigger vocab
packs more bytes into each token and looks worse per token). Bits per byte can: sum the nats
of every target token, sum the UTF-8 bytes those targets stand for, and divide,

    bpb = sum(nats) / (ln 2 * sum(bytes))

Special tokens (BOS) stand for 0 bytes and ignored targets (-1) for none, so both are left out
of both sums. The sums are all-reduced across ranks before the division, so each rank may
see a different slice of the validation stream and the number does not depend on world size.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, num_steps, token_bytes):
    """Bits per byte of `model` over at most `num_steps` (inputs, targets) batches from the iterator `batches`.

    A stream that ends sooner (e.g. DataLoader.one_pass() over a small validation split) is
    evaluated whole. Ranks may run out at different steps, even at step 0: every rank still
    meets the all-reduce, and only then do all of them fail together if no rank measured a byte.

    model(inputs, targets, loss_reduction="none") must return per-token losses in nats (B, T).
    token_bytes: int tensor (vocab_size,) on the model's device, the UTF-8 byte length of each
    token id, 0 for specials.
    """
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _, (inputs, targets) in zip(range(num_steps), batches):
        losses = model(inputs, targets, loss_reduction="none").flatten()
        targets = targets.flatten()
        nbytes = torch.where(targets >= 0, token_bytes[targets.clamp(min=0)], 0)
        # where(), not a product: a token with 0 bytes must contribute 0 nats even if its loss is inf
        total_nats += torch.where(nbytes > 0, losses.double(), 0.0).sum()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    if total_bytes.item() == 0:
        raise ValueError("nothing to measure: no batch on any rank, or targets that are all special or ignored; "
                         "give the evaluation more validation data (a batch needs batch_size x (seq_len + 1) tokens)")
    return total_nats.item() / (math.log(2) * total_bytes.item())
