"""Scaling laws and schedules as pure functions (no torch): depth -> shape -> every hyperparameter.

Sources (shared NOTES.md, "Model" and "Optimisation"; RECIPE.md for the record recipe):
- width = depth * 64 rounded up to the head dim (128); heads = width / 128
- horizon: tokens = ratio x Kaplan-style parameters (block matrices + lm_head); default ratio 12
  (RECIPE, was 10.5), the speedrun undertrains at 8
- batch (Power Lines): B_opt proportional to D^0.383; at a fixed ratio D/D_ref = N/N_d12, so
  B = 2^19 * (N / N_d12)^0.383 rounded to a power of two, the same for any ratio (2^20 at d24)
- learning rates were tuned at B = 2^19: x sqrt(B / 2^19) above it, held at those values below (lr_batch_scale)
- Muon weight decay from the T_epoch rule: 0.28 * sqrt(B / 2^19) * N_d12 / N (0.0597 at d24), faded to 0
  along a cosine; N_d12, the anchor of both laws, is the d12 model of the run's own aspect ratio and head dim
- LR: the record's 40-step warmup from B = 2^19 up, none below (default_warmup_steps), then constant, then a
  linear warmdown over the last ~65% to 5% of peak
- Muon momentum ramps 0.85 -> 0.97 over the first 400 steps, then falls to 0.90 over the warmdown
"""

import math

REF_DEPTH = 12
REF_BATCH_TOKENS = 2**19
BATCH_EXPONENT = 0.383
RECORD_WARMUP_STEPS = 40  # RECIPE: the record's linear LR warmup, at B = 2^20
REF_MUON_WEIGHT_DECAY = 0.28  # at d12, B = 2^19 (RECIPE R1: 0.28, was 0.2)
DEFAULT_PARAM_DATA_RATIO = 12.0  # RECIPE 1cd94d7 (was 10.5)
SPEEDRUN_PARAM_DATA_RATIO = 8.0  # RECIPE Run 6: the record undertrains to reach the CORE bar sooner
VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many leading channels (gpt.py imports it; RECIPE R1: 12)


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


def anchor_params(vocab_size, aspect_ratio=64, head_dim=128):
    """N_d12: the scaling parameters of the d12 model *of this run's shape* (its aspect ratio and head dim),
    the anchor of the batch law and the T_epoch weight decay, as the reference builds it. Anchoring a narrowed
    model on the default-width d12 instead made its Muon WD 4-15x the reference rule's (d4 at aspect 32 /
    head dim 64: 1.18 vs 0.30)."""
    return scaling_params(REF_DEPTH, vocab_size, aspect_ratio, head_dim)


def optimal_batch_tokens(num_scaling_params, vocab_size, aspect_ratio=64, head_dim=128):
    """B_opt = 2^19 * (N / N_d12)^0.383, rounded to the nearest power of two (in log space).

    Power Lines' B ~ D^0.383 with D = ratio * N at the d12 anchor's ratio: the ratio cancels, so
    a run at ratio 8 gets the same batch as one at 12 (RECIPE). N_d12 has the run's own shape."""
    batch = REF_BATCH_TOKENS * (num_scaling_params / anchor_params(vocab_size, aspect_ratio, head_dim)) ** BATCH_EXPONENT
    return 2 ** round(math.log2(batch))


def lr_batch_scale(batch_tokens):
    """The LRs were tuned at 2^19 tokens per step: x sqrt(B / 2^19) from there up (the record's rule, so B = 2^20
    gets exactly its LRs), and held at their 2^19 values below (a floor).

    Why not sqrt below 2^19 too: it left small-batch runs far under-trained. In an LR grid at the default aspect
    ratio (d4, width 256, and d6, width 384, at B = 2^11, 2^13, 2^15 over 3 seeds; 2^19 tokens a run) the 2^19
    values came within 0.010 val bpb of the best multiplier in every cell, and the sqrt rule's were 0.10-0.34
    worse. The fitted exponent, alpha = 0.064 +- 0.022, is gentler than the floor by ~3 s.e. but gains at most
    0.010 in these cells, and on the CPU preset it ties the floor: -0.0013 +- 0.0116 val bpb over 6 seeds
    (dev/LOG.md 2026-12-06), so the floor, the tuned LRs held, stays. On the CPU preset the floor beat its old
    hand-set 4x by 0.058 (it lost only while its sample repeated the same few hundred thousand tokens 4-5 times:
    dev/LOG.md 2026-12-03). Narrow models (width 64/96) want ~2x more still, but that optimum did not transfer
    across width, and the floor never sets an LR above one that was tuned.
    The Muon weight decay keeps sqrt(B / 2^19) (muon_weight_decay): every run above used it."""
    return math.sqrt(max(batch_tokens, REF_BATCH_TOKENS) / REF_BATCH_TOKENS)


def muon_weight_decay(num_scaling_params, batch_tokens, vocab_size, aspect_ratio=64, head_dim=128):
    """Muon weight decay from the T_epoch rule: 0.28 * sqrt(B / 2^19) * D_ref / D with D_ref / D = N_d12 / N.

    Keeps the decay's timescale (in epochs of the data) fixed: bigger models see more tokens per
    step count, so they decay less per step. 0.0597 at d24 (B = 2^20); 0.367 at d4 with vocab 4096
    and B = 2048."""
    n_ref = anchor_params(vocab_size, aspect_ratio, head_dim)
    return REF_MUON_WEIGHT_DECAY * math.sqrt(batch_tokens / REF_BATCH_TOKENS) * n_ref / num_scaling_params


def default_warmup_steps(batch_tokens):
    """--warmup-steps' default: the record's 40 steps from 2^19 tokens per step up (RECIPE; the d24 speedrun
    command gets exactly the record's schedule), none below, where it was measured as a cost.

    The warmup grid at the default LRs (dev/lr_grid.py --warmups 0,40,10%: d4 at B = 2^11, 2^13, 2^15 over 3
    seeds, 2^19 tokens a run, so 256 / 64 / 16 steps; paired by seed against none): 40 steps cost +0.026,
    +0.022 and +0.206 val bpb, 10% of the run (26 / 6 / 2 steps) +0.028, +0.051 and -0.003; d6 at 2^15 (3 seeds)
    +0.160 and +0.123, at 2^11 (3 seeds) +0.003 and +0.004, at 2^13 (3 seeds) +0.027 and +0.019. The one gain,
    2 steps at d4 2^15, did not hold at d6 (dev/LOG.md 2026-12-03, fifth session, and 2026-12-06). Before the LR
    floor: the whole of a 0.6-nat gap at step 50 of a d4 x 200-step run (dev/LOG.md 2026-11-30)."""
    return RECORD_WARMUP_STEPS if batch_tokens >= REF_BATCH_TOKENS else 0


def lr_multiplier(step, num_iterations, warmup_steps=0, warmdown_frac=0.65, final_lr_frac=0.05):
    """Optional warmup to 1, hold, then linear warmdown over the last warmdown_frac of training to final_lr_frac.
    The two ramps are combined with min(), so a run too short for both (e.g. 50 steps with a
    40-step warmup) peaks where they cross instead of jumping down from 1 when warmup ends."""
    warmup = (step + 1) / warmup_steps if warmup_steps > 0 else 1.0
    warmdown_start = num_iterations * (1 - warmdown_frac)
    progress = min(1.0, max(0.0, step - warmdown_start) / max(1e-9, num_iterations - warmdown_start))
    warmdown = 1.0 - progress * (1.0 - final_lr_frac)
    return min(1.0, warmup, warmdown)


def muon_momentum(step, num_iterations=None, warmdown_frac=0.65, start=0.85, end=0.97, ramp_steps=400,
                  final=0.90, ramp_first=False):
    """Ramps start -> end over ramp_steps; over the LR warmdown (the last warmdown_frac of
    num_iterations) it then falls linearly to `final` (RECIPE R2), i.e. less averaging as the LR
    anneals. num_iterations=None: the ramp only.

    The two overlap in a run shorter than ~1.5 x ramp_steps. Default: the fall starts from wherever the ramp
    is (a 300-step run ends at `final`). ramp_first=True is the reference's order: the ramp runs its
    400 steps regardless and the fall applies only after it (a 300-step run ends at 0.94; in a run of
    ~400-1100 steps the momentum steps down at step 400 to where the fall has got to, as RECIPE reads)."""
    momentum = start + (end - start) * min(1.0, step / ramp_steps)
    if num_iterations is None:
        return momentum
    if ramp_first and step < ramp_steps:
        return momentum
    warmdown_start = num_iterations * (1 - warmdown_frac)
    progress = min(1.0, max(0.0, step - warmdown_start) / max(1e-9, num_iterations - warmdown_start))
    return momentum + (final - momentum) * progress


def weight_decay_multiplier(step, num_iterations):
    """Muon's weight decay fades to zero along a cosine, 1/2 (1 + cos(pi step / N)) (RECIPE R1; was
    linear): full strength early, gone at the end so the final weights are not pulled to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * step / num_iterations))
