"""Scaling laws and schedules as pure functions (no torch): depth -> shape -> every hyperparameter.

Sources (shared NOTES.md, "Model" and "Optimisation"):
- width = depth * 64 rounded up to the head dim (128); heads = width / 128
- compute-optimal horizon: ~10.5 tokens per Kaplan-style parameter (block matrices + lm_head)
- batch (Power Lines): B_opt proportional to D^0.383 for D training tokens, anchored at d12
  trained at the 10.5 ratio = 2^19 tokens; rounded to the nearest power of two
- learning rates were tuned at B = 2^19 and scale with sqrt(B / 2^19)
- weight decay proportional to 1/width^2, anchored at d12 (width 768) = 0.22
- LR: constant from step 0 (no warmup by default), linear warmdown over the last ~65% to 5% of peak.
  NOTES and the July reference warm up for ~40 steps; the March reference did not, and at d4 / 200 steps
  the 40-step warmup alone was the whole of its 0.6-nat lead at step 50 (dev/LOG.md, 2026-11-30)
- Muon momentum ramps 0.85 -> 0.97 over the first ~400 steps
"""

import math

REF_DEPTH = 12
REF_BATCH_TOKENS = 2**19
BATCH_EXPONENT = 0.383
REF_WIDTH = 768
REF_WEIGHT_DECAY = 0.22
DEFAULT_PARAM_DATA_RATIO = 10.5
VE_GATE_CHANNELS = 32  # the value-embedding gate reads this many leading channels (gpt.py imports it)


def model_shape(depth, aspect_ratio=64, head_dim=128):
    """(width, n_heads) for a depth: width = depth * aspect_ratio rounded up to a multiple of head_dim."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    width = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    return width, width // head_dim


def scaling_params(depth, vocab_size, aspect_ratio=64, head_dim=128):
    """Kaplan-style parameter count of the GPT at this depth: block matrices + lm_head, no embeddings."""
    width, n_head = model_shape(depth, aspect_ratio, head_dim)
    padded_vocab = math.ceil(vocab_size / 64) * 64
    per_block = 4 * width * width + 2 * width * 4 * width  # q, k, v, proj + MLP in and out
    n_value_embed_layers = (depth + 1) // 2                # alternating, last layer included
    return depth * per_block + n_value_embed_layers * VE_GATE_CHANNELS * n_head + padded_vocab * width


def training_tokens(num_scaling_params, param_data_ratio=DEFAULT_PARAM_DATA_RATIO):
    return int(param_data_ratio * num_scaling_params)


def optimal_batch_tokens(train_tokens, vocab_size):
    """B_opt = 2^19 * (D / D_ref)^0.383, rounded to the nearest power of two (in log space)."""
    ref_tokens = training_tokens(scaling_params(REF_DEPTH, vocab_size))
    batch = REF_BATCH_TOKENS * (train_tokens / ref_tokens) ** BATCH_EXPONENT
    return 2 ** round(math.log2(batch))


def lr_batch_scale(batch_tokens):
    """Learning rates tuned at 2^19 tokens per step scale with sqrt(B / 2^19)."""
    return math.sqrt(batch_tokens / REF_BATCH_TOKENS)


def weight_decay_for_width(width):
    return REF_WEIGHT_DECAY * (REF_WIDTH / width) ** 2


def lr_multiplier(step, num_iterations, warmup_steps=0, warmdown_frac=0.65, final_lr_frac=0.05):
    """Optional warmup to 1, hold, then linear warmdown over the last warmdown_frac of training to final_lr_frac.
    The two ramps are combined with min(), so a run too short for both (e.g. 50 steps with a
    40-step warmup) peaks where they cross instead of jumping down from 1 when warmup ends."""
    warmup = (step + 1) / warmup_steps if warmup_steps > 0 else 1.0
    warmdown_start = num_iterations * (1 - warmdown_frac)
    progress = min(1.0, max(0.0, step - warmdown_start) / max(1e-9, num_iterations - warmdown_start))
    warmdown = 1.0 - progress * (1.0 - final_lr_frac)
    return min(1.0, warmup, warmdown)


def muon_momentum(step, start=0.85, end=0.97, ramp_steps=400):
    return start + (end - start) * min(1.0, step / ramp_steps)


def weight_decay_multiplier(step, num_iterations):
    """Weight decay fades linearly to zero over the run, so the final weights are not pulled to 0."""
    return 1.0 - step / num_iterations
