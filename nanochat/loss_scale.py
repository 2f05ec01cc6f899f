"""Dynamic loss scaling for NANOCHAT_DTYPE=float16, with a skip decision every rank agrees on.

fp16 gradients underflow without scaling, so the loss is multiplied by `scale` before
backward and the gradients divided by it before the optimizer step. A step whose gradients
hold an inf/NaN is skipped and the scale halved; after `growth_interval` clean steps it
doubles. The inf check is all-reduced (MAX) across ranks *before* the optimizer runs: a rank
that skipped alone would stop joining the optimizer's collectives and the ranks would
diverge (or hang) — single-GPU tests never show this. bf16 and fp32 runs do not use this.
"""

import torch
import torch.distributed as dist


class DynamicLossScaler:
    def __init__(self, init_scale=2.0**16, growth_interval=2000, enabled=True):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_and_check(self, params):
        """Divides gradients by the scale in place; True if any rank found an inf/NaN (same answer on all ranks)."""
        if not self.enabled:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scale)
        found = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().float().reshape(1)
        if dist.is_initialized():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item())

    def update(self, found_inf):
        if not self.enabled:
            return
        if found_inf:
            self.scale /= 2.0
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= 2.0
                self.clean_steps = 0

    def state_dict(self):
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state):
        self.scale, self.clean_steps = state["scale"], state["clean_steps"]
