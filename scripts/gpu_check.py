"""One command for the first minutes on a GPU node: everything CPU tests could not prove, in <= 10 minutes.

    python -m scripts.gpu_check                                   (one GPU; on CPU it runs what it can)
    torchrun --standalone --nproc_per_node=8 -m scripts.gpu_check  (adds the NCCL collectives)

Checks (rows PASS / WARN / FAIL / SKIP, preflight's Row and table; preflight's own checks are reused):
- gpu, software:      preflight's rows
- attention:          the backend training uses (FA3 on Hopper) against SDPA, forward and q/k/v gradients,
                      for every window of the pattern, with grouped-query heads, every FA3 call checked against
                      its contract (nanochat/contracts.py); on CPU the reference FA3 stands in (calling convention)
- fp8 gradients:      a compiled FP8 model against the same model compiled in bf16, gradient by gradient
- compile:            the full model as base_train compiles it (warm-up, first step, eval): zero graph breaks and
                      zero recompiles after the warm-up, every _scaled_mm / FA3 / SDPA call contract-checked
- collectives:        preflight's all_reduce / reduce_scatter / all_gather (>= 2 ranks)
- burst:              d12 (T 2048, batch 32) training steps: tok/s, MFU, peak memory against the memory plan
Every figure goes to one report (--report, JSON + readable text). Exit code 1 on any FAIL.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

from nanochat import contracts, memory_plan
from nanochat.cli import ArgumentParser, number
from nanochat.common import COMPUTE_DTYPE, cleanup_dist, get_base_dir, init_dist, peak_flops, print0, rel_err
from nanochat.fp8 import convert_to_fp8, disable_fp8, fp8_supported
from nanochat.gpt import GPT, GPTConfig
from scripts import base_train, preflight
from scripts.preflight import FAIL, PASS, SKIP, WARN, Row

# compiled fp8 vs compiled bf16, one parameter's gradient after one step from init: the per-layer fp8 error
# (<= 0.08, fp8.FP8_REL_TOL) compounds through the backward; tests/test_fp8.py measured up to 0.14 for
# compiled-vs-eager fp8. Broken kernels or layouts give ~1 or NaN.
FP8_GRAD_TOL = 0.35
SIZES = {  # per device type: (depth, T, batch) of the compile/fp8 model, and the burst's
    "cuda": {"model": (4, 1024, 8), "burst": (12, 2048, 32)},
    "cpu": {"model": (1, 64, 2), "burst": (2, 64, 4)},
}


def parse_args(argv=None):
    p = ArgumentParser(description="Check a GPU node with nanochat's own code: FA3, FP8, compile, NCCL, a d12 burst.")
    p.add_argument("--report", default="", help="report path without extension (default: <base>/gpu_check/report); "
                                                 ".json and .txt are written")
    p.add_argument("--burst-steps", type=number(int, low=1), default=10, help="timed optimizer steps of the burst")
    p.add_argument("--burst-fp8", type=int, default=1, choices=[0, 1], help="the burst trains in FP8 where supported")
    p.add_argument("--skip", default="", help="comma-separated checks to leave out: attention,fp8,compile,collectives,burst (default: none)")
    return p.parse_args(argv)


def gqa_config(device):
    """The attention shapes checked: the speedrun's T and head dim on CUDA, with 2 query heads per key/value head."""
    T = 2048 if device.type == "cuda" else 256
    return GPTConfig(sequence_len=T, vocab_size=256, n_layer=4, n_head=4, n_kv_head=2, n_embd=4 * 128)


def check_attention(device, figures):
    """preflight's per-window comparison, with GQA, under the contracts; on CPU through the reference FA3."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = gqa_config(device)
    fa3_mode = "real" if device.type == "cuda" else "reference"
    if fa3_mode == "reference":
        dtype = torch.bfloat16  # the reference FA3, like FA3, takes bf16 only
    with contracts.enforced(fa3=fa3_mode, sdpa=device.type == "cuda") as calls:
        rows = preflight.check_attention_windows(device, dtype, config)
        counted = dict(calls)
    label = "attention (reference FA3 on CPU)" if fa3_mode == "reference" else "attention"
    figures["attention"] = {"rows": [r.message for r in rows], "checked_calls": counted}
    rows = [r._replace(check=r.check.replace("attention", label)) for r in rows]
    if device.type == "cuda" and not counted.get("fa3"):
        rows.append(Row("fa3 contract", WARN if torch.cuda.get_device_capability(device)[0] != 9 else FAIL,
                        "no FA3 call was made: training would use SDPA here (see the flash attention row)"))
    else:
        rows.append(Row("fa3 contract", PASS, f"{counted.get('fa3', 0)} forward and {counted.get('fa3_backward', '-')} "
                                              "backward FA3 calls met the contract"))
    return rows


def small_model(device, fp8, seed=0):
    depth, T, _ = SIZES[device.type]["model"]
    model = GPT.build(GPTConfig.from_depth(depth, vocab_size=512, sequence_len=T), device, seed=seed,
                      compute_dtype=torch.bfloat16)
    with torch.no_grad():  # live output projections: every layer's gradient carries signal at step 0
        for block in model.blocks:
            for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                w.normal_(std=0.02)
    if fp8:
        convert_to_fp8(model)
    return model


def synthetic_pair(device, vocab=512):
    _, T, B = SIZES[device.type]["model"]
    tokens = torch.randint(vocab, (B, T + 1), device=device, generator=torch.Generator(device).manual_seed(0))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def check_fp8_gradients(device, figures):
    """The same weights and batch through a compiled FP8 model and a compiled bf16 one: every gradient close, finite."""
    ok, why = fp8_supported(device)
    if not ok:
        return [Row("fp8 gradients", SKIP, why)]
    batch = synthetic_pair(device)
    grads = {}
    with contracts.enforced(fa3="real" if device.type == "cuda" else None, sdpa=False) as calls:
        for name, fp8 in (("bf16", False), ("fp8", True)):
            model = small_model(device, fp8)
            torch.compile(model, dynamic=False)(*batch).backward()
            grads[name] = {n: p.grad.float() for n, p in model.named_parameters()}
        scaled_mm_calls = calls["scaled_mm"]
    # layer by layer: the blocks' matrices. The scalars' gradients are rounding noise at init (at depth <= 2 the
    # backout lambda's exactly cancels under the final RMSNorm), so they are only checked for being finite
    errors = {n: rel_err(grads["fp8"][n], g) for n, g in grads["bf16"].items() if n.startswith("blocks.") and g.abs().sum() > 0}
    nonfinite = [n for n, g in grads["fp8"].items() if not g.isfinite().all()]
    worst = max(errors, key=lambda n: errors[n] if math.isfinite(errors[n]) else math.inf)
    figures["fp8_gradients"] = {"rel_err": errors, "nonfinite": nonfinite, "scaled_mm_calls": scaled_mm_calls}
    message = (f"{len(errors)} block matrices' gradients, compiled fp8 vs compiled bf16: worst rel err {errors[worst]:.3f} ({worst}), "
               f"tolerance {FP8_GRAD_TOL}; {scaled_mm_calls} _scaled_mm calls met the contract")
    if nonfinite or not errors[worst] <= FP8_GRAD_TOL:
        return [Row("fp8 gradients", FAIL, f"{message}; non-finite: {nonfinite or 'none'}: train without --fp8 on this "
                                           "torch/GPU and report it")]
    return [Row("fp8 gradients", PASS, message)]


def check_compile(device, figures):
    """base_train's warm-up, then a first training step and an eval: no graph breaks, nothing recompiles after warm-up."""
    from torch._dynamo.utils import counters
    from nanochat.loss_scale import DynamicLossScaler
    depth, T, B = SIZES[device.type]["model"]
    args = base_train.parse_args(["--depth", str(depth), "--max-seq-len", str(T), "--device-batch-size", str(B),
                                  "--total-batch-size", str(B * T), "--num-iterations", "10"]
                                 + (["--fp8"] if fp8_supported(device)[0] and device.type == "cuda" else []))
    torch._dynamo.reset()
    counters.clear()
    with contracts.enforced(fa3="real" if device.type == "cuda" else None, sdpa=device.type == "cuda") as calls:
        model = base_train.build_model(args, 512, device)
        hp = base_train.resolve_hyperparameters(args, model, 1)
        optimizer = base_train.build_optimizer(model, hp, args)
        if args.fp8:
            convert_to_fp8(model)
        compiled = torch.compile(model, dynamic=False)
        scaler = DynamicLossScaler(enabled=COMPUTE_DTYPE == torch.float16)
        t0 = time.perf_counter()
        base_train.warm_up(compiled, model, optimizer, args, device, scaler)
        warm_up_s = time.perf_counter() - t0
        after_warm_up = counters["frames"]["total"]
        batches = preflight.synthetic_batches(512, B, T, device)
        base_train.train_step(model, compiled, optimizer, scaler, batches, 1)
        with torch.no_grad(), disable_fp8(model):  # as base_train evaluates
            compiled(*next(batches), loss_reduction="none")
        checked = dict(calls)
    breaks = sum(counters["graph_break"].values())
    recompiles = counters["frames"]["total"] - after_warm_up
    figures["compile"] = {"graph_breaks": dict(counters["graph_break"]), "frames_compiled_in_warm_up": after_warm_up,
                          "recompiles_after_warm_up": recompiles, "warm_up_s": warm_up_s, "checked_calls": checked}
    message = (f"d{depth} T{T} B{B}{' fp8' if args.fp8 else ''}: {after_warm_up} frames compiled in warm-up ({warm_up_s:.0f} s), "
               f"{breaks} graph breaks, {recompiles} recompiles over the first step and eval; checked calls {checked}")
    if breaks or recompiles:
        return [Row("compile", FAIL, f"{message}: {dict(counters['graph_break']) or 'see TORCH_LOGS=recompiles'}")]
    return [Row("compile", PASS, message)]


def check_burst(own, device, figures):
    """A d12 burst (CPU: a tiny stand-in) through preflight's run_burst, and its peak memory against the plan."""
    depth, T, B = SIZES[device.type]["burst"]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    flags = ["--depth", str(depth), "--max-seq-len", str(T), "--device-batch-size", str(B), "--window-pattern", "L",
             "--total-batch-size", str(B * T * world), "--num-iterations", "100"]
    fp8 = bool(own.burst_fp8) and device.type == "cuda" and fp8_supported(device)[0]
    args = base_train.parse_args(flags + (["--fp8"] if fp8 else []) + ([] if device.type == "cuda" else ["--compile", "0"]))
    with torch.device("meta"):
        meta = GPT(base_train.build_config(args, 32768))
    hp = base_train.resolve_hyperparameters(args, meta, world)
    plan = memory_plan.plan_training_step(meta.config, B, world, fp8, COMPUTE_DTYPE if device.type == "cuda" else
                                          torch.bfloat16, hp["grad_accum_steps"])
    figures["burst_plan"] = {"peak_bytes": plan.peak_bytes, "by_kind": plan.by_kind, "required_bytes": plan.required_bytes}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, rates = preflight.run_burst(args, hp, 32768, device, peak_flops(device)[0], own.burst_steps, 2)
    figures["burst"] = {"rates": rates, "message": rows[0].message}
    rows = [r._replace(check="burst") for r in rows]
    if device.type != "cuda":
        return rows + [Row("burst memory", SKIP, f"no CUDA peak to compare on {device.type}; plan of the d{depth} burst: "
                                                 f"{plan.summary()}")]
    measured = torch.cuda.max_memory_allocated(device)
    error = memory_plan.relative_error(plan.peak_bytes, measured)
    figures["burst_memory"] = {"measured_peak_bytes": measured, "plan_peak_bytes": plan.peak_bytes, "plan_rel_err": error}
    message = (f"measured peak {measured / 2**30:.2f} GiB, plan {plan.peak_bytes / 2**30:.2f} GiB (eager trace), "
               f"plan error {error:+.1%}")
    # the plan traces the eager step: compiled steps measured lower on CPU (0.67x); above the plan is the problem
    status = PASS if measured <= plan.peak_bytes * (1 + memory_plan.PLAN_MARGIN_FRACTION) else WARN
    return rows + [Row("burst memory", status, message if status == PASS else
                       f"{message}: above the plan's margin; widen PLAN_MARGIN_FRACTION in nanochat/memory_plan.py")]


def guarded(name, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # a crash is a finding; the other checks still run and the report is still written
        return [Row(name, FAIL, f"crashed with {type(e).__name__}: {str(e)[:500]}")]


def run_checks(own, device):
    figures, skip = {}, set(filter(None, own.skip.split(",")))
    rows = preflight.check_gpu(device) + preflight.check_software(device)
    if device.type == "cuda":
        with torch.device("meta"):
            rows += preflight.check_flash_attention(device, COMPUTE_DTYPE, GPT(gqa_config(device)), 1)
    else:
        rows += [Row("flash attention", SKIP, "no CUDA: FA3 cannot load; the reference FA3 stands in below")]
    steps = [("attention", check_attention), ("fp8", check_fp8_gradients), ("compile", check_compile)]
    for name, fn in steps:
        rows += [Row(name, SKIP, "--skip")] if name in skip else guarded(name, fn, device, figures)
    if "collectives" in skip:
        rows += [Row("collectives", SKIP, "--skip")]
    else:
        rows += preflight.guarded(["all_reduce", "reduce_scatter", "all_gather"], preflight.check_collectives, device)
    rows += [Row("burst", SKIP, "--skip")] if "burst" in skip else guarded("burst", check_burst, own, device, figures)
    return rows, figures


def write_report(path, rows, figures, device):
    """<path>.json (rows and every figure) and <path>.txt (the table); returns the two paths."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
              "torch": torch.__version__, "compute_dtype": str(COMPUTE_DTYPE), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "rows": [r._asdict() for r in rows], "figures": figures}
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(path + ".txt", "w") as f:
        f.write(preflight.format_table(rows).replace("preflight ", "gpu_check ") + "\n")
    return path + ".json", path + ".txt"


def main(argv=None):
    own = parse_args(argv)
    dist_info = init_dist()
    rows, figures = run_checks(own, dist_info.device)
    rows = preflight.merge_rows(preflight.gather_rows(rows))
    if dist_info.is_master:
        path = own.report or os.path.join(get_base_dir(), "gpu_check", "report")
        json_path, txt_path = write_report(path, rows, figures, dist_info.device)
        print0(preflight.format_table(rows).replace("preflight ", "gpu_check "))
        print0(f"report: {json_path} and {txt_path}")
    cleanup_dist()
    return 1 if any(r.status == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
