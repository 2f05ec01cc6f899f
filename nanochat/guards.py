"""Run guards: a diverged run stops before it writes NaN into its weights, and loss spikes are flagged.

- `nonfinite_loss_ranks(loss)`: which ranks hold a non-finite training loss, the same answer on
  every rank (one all-reduce of a world-size vector), so all ranks stop after the same step and
  none is left waiting in a collective. The loop asks before the optimizer step, at the point
  where it already waits for the backward pass, so on a GPU the check adds no extra sync.
- `check_finite(named_tensors)`: the last line of defence before a checkpoint is written: a
  gradient can go non-finite while the loss is still finite, and the next step's loss would only
  say so after the weights were saved. A checkpoint never holds a NaN or inf.
- `SpikeDetector`: a step's loss far above its recent level (rule below), logged as a warning.
  It only reports: at the scales measured here no run spiked (1x-32x the default LRs), and the one
  failure seen, an outright divergence, is the guard's to stop, so a rollback-and-skip had nothing
  to act on and was not built (dev/LOG.md, 2026-12-02).
"""

import math
import statistics
from collections import deque

import torch
import torch.distributed as dist


class TrainingDiverged(Exception):
    """The run stopped because a loss or a tensor went non-finite; the message says where and how to go on."""


def nonfinite_loss_ranks(loss):
    """Ranks (sorted) whose `loss` (a 0-D tensor) is NaN or inf, as {rank: 'nan' | 'inf'}; empty when all are finite."""
    code = 0.0 if torch.isfinite(loss) else (2.0 if torch.isnan(loss) else 1.0)
    if not dist.is_initialized():
        return {0: _KIND[code]} if code else {}
    device = loss.device if dist.get_backend() == "nccl" else torch.device("cpu")
    codes = torch.zeros(dist.get_world_size(), dtype=torch.float32, device=device)
    codes[dist.get_rank()] = code
    dist.all_reduce(codes)  # each rank fills only its own slot: the sum is the gathered vector
    return {rank: _KIND[c] for rank, c in enumerate(codes.tolist()) if c}


_KIND = {1.0: "inf", 2.0: "nan"}


def check_finite(named_tensors):
    """Name of the first tensor holding a NaN/inf among (name, tensor) pairs, or None (all finite)."""
    for name, t in named_tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def divergence_hint(args):
    """What usually causes a divergence in this run's settings: the LR flags above their defaults, low precision."""
    defaults = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}
    hot = [f"--{k.replace('_', '-')} {getattr(args, k):g} ({getattr(args, k) / v:.3g}x default)"
           for k, v in defaults.items() if getattr(args, k) > v]
    hint = f"lower {', '.join(hot)}" if hot else "lower the learning rates (e.g. --matrix-lr) or add --warmup-steps"
    return hint + " (a rerun with NANOCHAT_DTYPE=float32 rules out precision)"


class SpikeDetector:
    """Flags a training loss spike: loss > median + max(K robust sigmas, MIN_EXCESS) over the last WINDOW steps.

    Why this rule: the per-step loss at small batch is noisy (robust sigma 0.08-0.4 nats at d4, B = 2048,
    with step-to-step jumps up to 0.47 nats in healthy runs) and falls fast early on, so a fixed ratio
    to the mean is either blind early or noisy late; median and MAD (x 1.4826: sigma for Gaussian
    noise) ignore the spike itself and older outliers, and the threshold scales with the run's own
    noise. At K = 6 a flagged step sits ~0.5-2 nats above its level: in 700 steps at 1x, 8x and 32x
    the default LRs nothing was flagged (not even at K = 3), while a 1-nat jump is (dev/LOG.md,
    2026-12-02). The spike's own loss does not enter the window, so a run that stays high is reported
    once per step it stays there.
    """

    WINDOW, K, MIN_EXCESS = 50, 6.0, 0.25

    def __init__(self):
        self.recent = deque(maxlen=self.WINDOW)

    def update(self, loss):
        """Returns (median, threshold) when `loss` is a spike, else None; only non-spikes join the window."""
        spike = None
        if len(self.recent) == self.WINDOW and math.isfinite(loss):
            median = statistics.median(self.recent)
            sigma = 1.4826 * statistics.median(abs(x - median) for x in self.recent)
            threshold = median + max(self.K * sigma, self.MIN_EXCESS)
            if loss > threshold:
                spike = (median, threshold)
        if spike is None and math.isfinite(loss):
            self.recent.append(loss)
        return spike

    def state_dict(self):
        return {"recent": list(self.recent)}

    def load_state_dict(self, state):
        self.recent = deque(state["recent"], maxlen=self.WINDOW)
