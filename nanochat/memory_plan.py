"""A rank's peak training memory, predicted by tracing one real training step on fake tensors.

`plan_training_step(config, device_batch_size, ...)` builds the GPT on FakeTensors (shapes, dtypes
and strides, no storage), applies the run's FP8 conversion and MuonAdamW (sharded as ZeRO-2 shards it
at the run's world size, through torch's fake process group), then runs forward, backward (when the run accumulates, as a later
micro-step: with every gradient alive through the forward) and the optimizer step under torch.distributed._tools.mem_tracker.MemTracker. MemTracker counts every
storage alive after each op, rounded up to 512 bytes like the CUDA caching allocator, and keeps the
peak by kind (parameters, gradients, optimizer state, activations, temporaries). It is the same code
that training runs (model, fused chunked loss, FP8 ops' fakes, optimizer), so the activation dtype is
the plan's compute dtype (bf16 on a GPU), and nothing is estimated by hand. Tracing d24 takes ~15 s.

`measure_cpu_step_peak` measures the same step on real CPU tensors (torch.profiler's allocator
events: every byte the CPU allocator hands out), which is how the plan is validated (dev/LOG.md).

What the trace cannot see, and the margin for it (`PLAN_MARGIN_FRACTION`, `PLAN_MARGIN_FIXED_BYTES`):
- the caching allocator's fragmentation (expandable segments, common.py, keep it small);
- memory outside the allocator: the CUDA context (~0.5 GiB), NCCL's buffers (~0.5-1 GiB per rank);
- workspaces: cuBLAS/cuBLASLt (tens of MiB), FA3's fp32 dq accumulator in backward (one layer's
  q in fp32 at a time), which the fake trace replaces with CPU SDPA's memory (it saves the same
  output + log-sum-exp as FA3);
- torch.compile: the plan traces the eager step; inductor fuses elementwise chains and may save or
  recompute differently (on CPU the compiled step's peak was measured against the eager one, LOG).
"""

import math
import os
import time
from dataclasses import dataclass, field

import torch

PLAN_MARGIN_FRACTION = 0.10  # fragmentation, compile's different saved set, workspaces that scale with the batch
PLAN_MARGIN_FIXED_BYTES = 2 * 2**30  # CUDA context, NCCL buffers, cuBLAS workspaces: outside the trace
KINDS = ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Buffer")


@dataclass
class MemoryPlan:
    peak_bytes: int
    by_kind: dict  # bytes of each MemTracker kind at the peak
    storage: dict  # {"parameters": {dtype: bytes}, "optimizer state": {dtype: bytes}}
    shape: dict = field(default_factory=dict)  # what was traced: depth, vocab, T, batch, world size, fp8, dtype
    trace_s: float = 0.0

    @property
    def required_bytes(self):
        """The peak with the safety margin: what the device must have for the plan to call it a fit."""
        return int(self.peak_bytes * (1 + PLAN_MARGIN_FRACTION) + PLAN_MARGIN_FIXED_BYTES)

    def fits(self, device_bytes):
        return self.required_bytes <= device_bytes

    def summary(self):
        s = self.shape
        kinds = ", ".join(f"{k.lower()} {_gib(v)}" for k, v in self.by_kind.items() if v >= 2**20)
        return (f"d{s['depth']} vocab {s['vocab_size']:,} T {s['seq_len']} batch {s['device_batch_size']} "
                f"{'accumulating' if s['micro_steps'] > 1 else 'one micro-step'}, world {s['world_size']}, {s['compute_dtype']}"
                f"{', fp8' if s['fp8'] else ''}: peak {_gib(self.peak_bytes)} ({kinds}); with margin "
                f"{_gib(self.required_bytes)} (+{PLAN_MARGIN_FRACTION:.0%} + {_gib(PLAN_MARGIN_FIXED_BYTES)})")


def _gib(n_bytes):
    return f"{n_bytes / 2**30:.2f} GiB"


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# -----------------------------------------------------------------------------
# the step that is traced (and measured)

def _meta_model(config, compute_dtype):
    """The GPT on the meta device (built outside any FakeTensorMode: fake meta parameters cannot be cast)."""
    from nanochat.gpt import GPT
    with torch.device("meta"):
        return GPT(config, compute_dtype=compute_dtype)


def _materialise_fake(model):
    """Gives a meta model fake storage, in place (call inside FakeTensorMode). Module._apply cannot swap
    FakeTensor parameters, so each parameter and buffer is replaced directly."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                              requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return model


def _with_optimizer(model, fp8):
    """The run's FP8 conversion and MuonAdamW (eager updates: see the module docstring)."""
    from nanochat.fp8 import convert_to_fp8
    if fp8:
        convert_to_fp8(model)
    return model, model.setup_optimizer(compiled=False)


def _training_step(model, optimizer, config, device_batch_size, micro_steps):
    """One optimizer step as base_train.train_step runs it: micro-steps of forward + scaled backward, step, zero_grad."""
    for _ in range(micro_steps):
        tokens = torch.randint(config.vocab_size, (device_batch_size, config.sequence_len + 1))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        (loss / micro_steps).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)


def _storage_by_dtype(tensors):
    out = {}
    for t in tensors:
        out[_dtype_name(t.dtype)] = out.get(_dtype_name(t.dtype), 0) + t.numel() * t.element_size()
    return out


def _device_peak_tracker():
    """torch's MemTracker without its per-module peaks, which the plan never reads. Its _update_peak_stats
    walks every module seen so far on every op, O(ops x modules): 43 of the 68 s of a d24 dry run on a
    2-core AMD EPYC. What remains is that function's second half, the device-wide peak the plan reads
    (torch 2.13 distributed/_tools/mem_tracker.py; test_memory_plan checks the plan against real steps)."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class DevicePeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state):
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)
    return DevicePeakTracker()


def _trace(config, device_batch_size, world_size, fp8, compute_dtype, micro_steps):
    """In this process, with no real process group: the plan (see plan_training_step)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from nanochat import attention

    fake_pg = world_size > 1
    if fake_pg:  # MuonAdamW shards by the process group's size: torch's fake backend gives it one, collectives are no-ops
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    attention.cached_band_mask.cache_clear()  # a mask cached from another (fake or real) mode must not leak in
    t0 = time.perf_counter()
    try:
        model = _meta_model(config, compute_dtype)
        with FakeTensorMode():
            model, optimizer = _with_optimizer(_materialise_fake(model), fp8)
            tracker = _device_peak_tracker()
            tracker.track_external(model, optimizer)
            with tracker:
                if micro_steps > 1:  # a later micro-step: every gradient is alive through its forward and backward.
                    for p in model.parameters():  # Tracing that one step (not two) halves the trace; the first
                        p.grad = torch.zeros_like(p)  # micro-step's peak is never higher (the test measures two)
                _training_step(model, optimizer, config, device_batch_size, 1)
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            storage = {"parameters": _storage_by_dtype(model.parameters()), "optimizer state": _storage_by_dtype(state)}
    finally:
        attention.cached_band_mask.cache_clear()
        if fake_pg:
            dist.destroy_process_group()
    by_kind = {str(getattr(k, "value", k)): int(v) for k, v in peak.items() if str(getattr(k, "value", k)) in KINDS}
    shape = dict(depth=config.n_layer, vocab_size=config.vocab_size, seq_len=config.sequence_len,
                 device_batch_size=device_batch_size, micro_steps=micro_steps, world_size=world_size, fp8=fp8,
                 compute_dtype=_dtype_name(compute_dtype))
    return MemoryPlan(int(peak["Total"]), by_kind, storage, shape, time.perf_counter() - t0)


def plan_training_step(config, device_batch_size, world_size=1, fp8=False, compute_dtype=torch.bfloat16,
                       grad_accum_steps=1):
    """The MemoryPlan of one rank's training step; allocates nothing on any device.

    compute_dtype: the target's activation dtype (bf16 on an SM >= 80 GPU), whatever this machine uses.
    grad_accum_steps > 1 traces two micro-steps (the second forward runs with all gradients alive).
    Inside a real process group (torchrun) the trace runs in a fresh process, where torch's fake group can stand
    in for world_size ranks."""
    import torch.distributed as dist
    args = (config, device_batch_size, world_size, fp8, compute_dtype, 2 if grad_accum_steps > 1 else 1)
    if world_size > 1 and dist.is_initialized():
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_trace, args)
    return _trace(*args)


def largest_fitting_batch(config, device_bytes, total_batch_tokens, world_size=1, fp8=False,
                          compute_dtype=torch.bfloat16, max_batch=1024):
    """(batch, its plan, every plan tried): the largest power-of-two device batch whose plan fits device_bytes.

    A batch may hold at most the total batch (total_batch_tokens per optimizer step over world_size ranks), and
    decides whether the step accumulates. (None, None, plans) when not even batch 1 fits."""
    T = config.sequence_len
    cap = min(max_batch, max(1, total_batch_tokens // (T * world_size)))
    best, plans, batch = (None, None), [], 1
    while batch <= cap:
        accum = max(1, total_batch_tokens // (batch * T * world_size))
        plans.append(plan_training_step(config, batch, world_size, fp8, compute_dtype, accum))
        if not plans[-1].fits(device_bytes):
            break
        best = (batch, plans[-1])
        batch *= 2
    return (*best, plans)


def target_compute_dtype():
    """The activation dtype to plan for: the run's COMPUTE_DTYPE on a GPU or when NANOCHAT_DTYPE sets it, else bf16
    (a plan made on a CPU box is for the GPU run, whose activations are bf16)."""
    from nanochat.common import COMPUTE_DTYPE
    return COMPUTE_DTYPE if torch.cuda.is_available() or "NANOCHAT_DTYPE" in os.environ else torch.bfloat16


def total_batch_tokens(model, total_batch_size):
    """The run's tokens per optimizer step: --total-batch-size, or the scaling law's (as base_train resolves it)."""
    from nanochat.scaling import optimal_batch_tokens
    return total_batch_size if total_batch_size > 0 else optimal_batch_tokens(model.num_scaling_params(),
                                                                             model.config.vocab_size)


def plan_device_batch(model, device_batch_size, total_batch_size, world_size, fp8, compute_dtype, device):
    """(device batch, lines to print): the plan of the run's batch, or for device_batch_size 0 (--device-batch-size
    auto) the largest power of two whose plan, with the margin, fits the device's memory (system RAM on CPU).
    Raises SystemExit when auto finds that not even batch 1 fits."""
    device_bytes, what = device_memory_bytes(device)
    total = total_batch_tokens(model, total_batch_size)
    T = model.config.sequence_len
    if device_batch_size:
        accum = max(1, total // (device_batch_size * T * world_size))
        plan = plan_training_step(model.config, device_batch_size, world_size, fp8, compute_dtype, accum)
        verdict = "fits" if plan.fits(device_bytes) else "does NOT fit (lower --device-batch-size, or 'auto')"
        return device_batch_size, [f"memory plan: {plan.summary()}; {verdict} in {what} ({_gib(device_bytes)})"]
    batch, plan, plans = largest_fitting_batch(model.config, device_bytes, total, world_size, fp8, compute_dtype)
    lines = [f"memory plan per rank ({what}: {_gib(device_bytes)}), traced on fake tensors:"]
    lines += [f"  batch {p.shape['device_batch_size']:>4}: {'fits' if p.fits(device_bytes) else 'does not fit'}, "
              f"{p.summary()}" for p in plans]
    if batch is None:
        raise SystemExit(f"--device-batch-size auto: not even one sequence of {T} tokens fits in {_gib(device_bytes)} "
                         f"({plans[0].summary()}); lower --max-seq-len or --depth, or use more ranks")
    lines.append(f"--device-batch-size auto: {batch} (the largest power of two that fits, at most the total batch "
                 f"{total:,} tokens / ({T} x {world_size} ranks))")
    return batch, lines


def device_memory_bytes(device):
    """(bytes, what they are): a CUDA device's total memory, or on CPU the system RAM (the 'device' of a CPU run)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system RAM (CPU run: RAM is the device memory)"


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# -----------------------------------------------------------------------------
# the real step on CPU, for validation

def measure_cpu_step_peak(config, device_batch_size, fp8=False, compute_dtype=torch.float32, grad_accum_steps=1,
                          compile_model=False):
    """Peak bytes of the same training step on real CPU tensors: the live model and optimizer state before the step
    plus the highest total the CPU allocator reached during it (torch.profiler memory events, which see every
    allocation torch makes, unlike tracemalloc). compile_model: run the forward through torch.compile."""
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    from nanochat.gpt import GPT
    model, optimizer = _with_optimizer(GPT.build(config, "cpu", seed=0, compute_dtype=compute_dtype), fp8)
    step_model = torch.compile(model, dynamic=False) if compile_model else model
    micro_steps = 2 if grad_accum_steps > 1 else 1
    if compile_model:  # compile outside the measured step (compilation allocates too), then start from clean grads
        _training_step(step_model, optimizer, config, device_batch_size, micro_steps)
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    resident += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _training_step(step_model, optimizer, config, device_batch_size, micro_steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"
              and e["args"].get("Device Type", 0) == 0]
    return resident + max(totals, default=0)


def relative_error(plan_bytes, measured_bytes):
    return (plan_bytes - measured_bytes) / measured_bytes if measured_bytes else math.inf
