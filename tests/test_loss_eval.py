"""Bits per byte: the closed form for known distributions, byte weighting, excluded specials and
ignored targets, the real GPT end to end. World size 1 vs 2 is in test_core_eval (one torchrun)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval_helpers import ByteTokenizer, tiny_gpt
from nanochat.loss_eval import evaluate_bpb


class FixedDistribution(nn.Module):
    """Predicts the same next-token distribution softmax(logits) at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, idx, targets, loss_reduction="mean"):
        z = self.logits.expand(targets.numel(), -1)
        return F.cross_entropy(z, targets.flatten(), ignore_index=-1, reduction=loss_reduction).view(targets.shape)


def random_batches(num_batches, vocab_size, B=3, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        targets = torch.randint(0, vocab_size, (B, T), generator=g)
        targets[torch.rand(B, T, generator=g) < 0.1] = -1
        batches.append((torch.zeros(B, T, dtype=torch.long), targets))
    return batches


def test_uniform_prediction_over_single_bytes_is_log2_vocab():
    batches = random_batches(4, 256)
    bpb = evaluate_bpb(FixedDistribution(torch.zeros(256)), iter(batches), 4, torch.ones(256, dtype=torch.int32))
    assert bpb == pytest.approx(math.log2(256), rel=1e-7)  # per-token losses are fp32


def test_known_distribution_with_multibyte_tokens_and_specials_matches_closed_form():
    # token 4 is special (0 bytes), the others stand for 1 to 3 bytes
    token_bytes = torch.tensor([1, 2, 3, 1, 0, 2], dtype=torch.int32)
    probs = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.05, 0.1], dtype=torch.float64)
    batches = random_batches(5, 6)
    counts = [0] * 6
    for _, targets in batches:
        for t in targets.flatten().tolist():
            if t >= 0:
                counts[t] += 1
    # closed form: sum_v n_v * -log2 p_v / sum_v n_v * bytes_v over non-special v
    bits = sum(n * -math.log2(probs[v]) for v, n in enumerate(counts) if token_bytes[v] > 0)
    nbytes = sum(n * int(token_bytes[v]) for v, n in enumerate(counts))
    assert counts[4] > 0  # the special token does occur, and must not count
    model = FixedDistribution(probs.log().float())
    assert evaluate_bpb(model, iter(batches), 5, token_bytes) == pytest.approx(bits / nbytes, rel=1e-6)


def test_special_targets_contribute_no_nats_even_when_infinite():
    # the model gives the special token probability 0 (infinite loss): it has 0 bytes, so it is left out
    logits = torch.tensor([0.0, 0.0, float("-inf")])
    targets = torch.tensor([[0, 2, 1, -1, 2]])
    bpb = evaluate_bpb(FixedDistribution(logits), iter([(targets, targets)]), 1, torch.tensor([1, 1, 0]))
    assert bpb == pytest.approx(1.0)  # two 1-byte tokens at p = 1/2 each


def test_a_stream_shorter_than_num_steps_is_evaluated_whole():
    model, token_bytes = FixedDistribution(torch.zeros(4)), torch.ones(4, dtype=torch.int32)
    batches = random_batches(2, 4)
    assert evaluate_bpb(model, iter(batches), 3, token_bytes) == evaluate_bpb(model, iter(batches), 2, token_bytes)


def test_bad_streams_fail_clearly():
    model, token_bytes = FixedDistribution(torch.zeros(4)), torch.ones(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="no batch on any rank"):
        evaluate_bpb(model, iter([]), 3, token_bytes)
    only_ignored = [(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1))]
    with pytest.raises(ValueError, match="nothing to measure"):
        evaluate_bpb(model, iter(only_ignored), 1, token_bytes)


def test_real_gpt_end_to_end():
    """A freshly initialised GPT predicts almost uniformly (lm_head std 0.001), so over single-byte
    tokens its bpb is ~log2(257); BOS targets are excluded."""
    tokenizer = ByteTokenizer()
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 8
    ids = torch.tensor(tokenizer.encode(text, prepend_bos=True))
    ids[::50] = tokenizer.bos_token_id
    B, T = 4, 32
    rows = ids[:B * (T + 1)].view(B, T + 1)
    batches = [(rows[:, :-1], rows[:, 1:])]
    bpb = evaluate_bpb(tiny_gpt(sequence_len=T), iter(batches), 1, tokenizer.token_bytes())
    assert bpb == pytest.approx(math.log2(257), rel=1e-3)
