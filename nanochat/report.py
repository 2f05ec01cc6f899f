"""Run reporting: one `RunLog` per run (a local JSONL always, wandb when asked) and MFU arithmetic.

A run directory holds
- `run.json`: what the run is (config, model shape, data signature, device) — written once,
  atomically; `compare_runs` reads its `data_signature` to refuse apples-to-oranges comparisons
- `log.jsonl`: every logged dict, one JSON object per line, each with a "step" key
Only rank 0 writes. wandb is optional and never required to read a run back.
"""

import json
import math
import os
import time

MFU_HEALTHY = 0.40  # NOTES: healthy MFU on 8xH100 is 40-60%


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def model_flops_utilization(flops_per_token, tokens_per_s, peak_flops_per_device, world_size=1):
    """MFU = flops_per_token * tokens_per_s / (peak * devices); None when the peak is unknown."""
    if not peak_flops_per_device:
        return None
    return flops_per_token * tokens_per_s / (peak_flops_per_device * world_size)


def diagnose_low_mfu(mfu, data_wait_frac, optim_frac, tokens_per_micro_step):
    """One line naming what most likely holds MFU under 40%, or '' when it is healthy or unknown.

    data_wait_frac / optim_frac: shares of step time spent waiting for the loader and in the
    optimizer step (which includes the gradient reduce-scatter/all-gather, i.e. sync time).
    """
    if mfu is None or mfu >= MFU_HEALTHY:
        return ""
    if data_wait_frac >= max(optim_frac, 0.10):
        return (f"MFU {mfu:.1%} < 40%: data wait is {data_wait_frac:.0%} of step time — the loader cannot keep up "
                "(more loader threads, faster disk, or pre-tokenised shards)")
    if optim_frac >= 0.15:
        return (f"MFU {mfu:.1%} < 40%: the optimizer step (incl. gradient sync) is {optim_frac:.0%} of step time — "
                "check the interconnect (scripts.preflight) or raise the per-device batch to amortise it")
    return (f"MFU {mfu:.1%} < 40%: neither data ({data_wait_frac:.0%}) nor sync ({optim_frac:.0%}) dominates; the "
            f"device batch of {tokens_per_micro_step} tokens per micro-step is likely too small — raise --device-batch-size")


def start_wandb(run_name, run_info, run_dir):
    """A wandb run; without credentials (or reachable servers) an offline one, with one warning line.

    Offline rather than an error: by the time wandb starts the run has been configured and its data
    checked, and losing it over a missing login helps no one; the local files are complete either way
    and `wandb sync` uploads them later. WANDB_MODE=disabled turns wandb off, as usual."""
    import wandb  # imported lazily: a run without a name never pays wandb's import time
    settings = dict(project="nanochat", name=run_name, config=run_info, dir=run_dir)
    try:
        return wandb.init(**settings)
    except wandb.errors.Error as e:
        print(f"WARNING: wandb: {' '.join(str(e).split())} — logging offline instead; upload later with "
              f"`wandb sync {os.path.join(run_dir, 'wandb', 'offline-run-*')}` (WANDB_MODE=disabled: no wandb at all)")
        return wandb.init(mode="offline", **settings)


class RunLog:
    def __init__(self, run_dir, run_name, run_info, use_wandb=False, resume_step=None, enabled=True):
        """run_info: JSON-able dict stored as run.json. resume_step: drop log lines past it (a crashed tail)."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, "log.jsonl")
        self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "run.json"), {"run": run_name, "created": time.time(), **run_info})
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
        elif resume_step is None and os.path.exists(self.path):
            os.replace(self.path, self.path + f".old{int(time.time())}")  # a fresh run never mixes with an old log
        self.file = open(self.path, "a")
        if use_wandb:
            self.wandb = start_wandb(run_name, run_info, run_dir)

    def log(self, record):
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record.get("step"))

    def finish(self):
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
