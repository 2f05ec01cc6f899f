"""Time to GPT-2 on 8xH100 on paper (issue 29): training FLOPs of a recipe at the record's own effective MFU.

    python dev/projection.py

Assumptions, each printed with the table:
- FLOPs per token are GPT.estimate_flops (6 x scaling params + attention over each layer's window, T 2048);
  a run's FLOPs are that x total batch x steps. Steps come from the horizon: ratio x scaling params / batch,
  batch from scaling.optimal_batch_tokens unless the recipe fixes it.
- The record (Run 6: d24, ratio 8, 99.0 min, RECIPE.md) sets the effective MFU: its FLOPs / (99.0 min x 8 x
  989 TFLOP/s, the H100's dense bf16 peak). Every row runs at that MFU, so a row differs from 99.0 min only
  through its FLOPs: no row pays for a kernel that is not in the record (MuonClip, a fused loss) or gains
  from one, and none says whether the model reaches GPT-2's CORE; the PRs' measured times are beside it.
"""

import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from nanochat import scaling  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

H100_BF16_PEAK_FLOPS = 989e12
RECORD_MIN = 99.0
# name, depth, vocab, ratio (or None: steps given), batch (None: the scaling rule), steps, measured minutes
RECIPES = [
    ("today's defaults = Run 6 (d24, ratio 8)", 24, 32768, 8, None, None, 99.0),
    ("PR #733 shape (d22, ratio 11.05, B 2^20)", 22, 32768, 11.05, 2**20, None, 88.2),
    ("PR #747 shape (d22, 11,600 steps at B 2^19)", 22, 32768, None, 2**19, 11600, 87.0),
    ("PR #830 shape (d22, ratio 9.4, vocab 49,152)", 22, 49152, 9.4, None, None, 81.8),
]


def run_flops(depth, vocab_size, ratio, batch_tokens, steps):
    """(training FLOPs, steps, batch tokens) of one recipe."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=2048))
    params = model.num_scaling_params()
    batch_tokens = batch_tokens or scaling.optimal_batch_tokens(params, vocab_size)
    steps = steps or round(scaling.training_tokens(params, ratio) / batch_tokens)
    return model.estimate_flops() * batch_tokens * steps, steps, batch_tokens


def main():
    record_flops = run_flops(24, 32768, 8, None, None)[0]
    mfu = record_flops / (RECORD_MIN * 60 * 8 * H100_BF16_PEAK_FLOPS)
    print(f"effective MFU of the record: {mfu:.3f} of 8 x {H100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s (bf16 dense)\n")
    print(f"| recipe | steps | batch | FLOPs | projected min | measured min |\n|---|---|---|---|---|---|")
    for name, depth, vocab, ratio, batch, steps, measured in RECIPES:
        flops, steps, batch = run_flops(depth, vocab, ratio, batch, steps)
        minutes = flops / (mfu * 8 * H100_BF16_PEAK_FLOPS) / 60
        print(f"| {name} | {steps:,} | 2^{batch.bit_length() - 1} | {flops:.3e} | {minutes:.1f} | {measured} |")


if __name__ == "__main__":
    main()
