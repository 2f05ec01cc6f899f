"""Pretrain a GPT from raw text: the training loop, and the one place where modules are wired together.

One process:   python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8
Many:          torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 24 --fp8 --run NAME
Multi-node:    torchrun --nnodes=N --node_rank=R --rdzv-endpoint=HOST:PORT --nproc_per_node=8 -m scripts.base_train -- ...

`--depth` sets the model; the scaling laws in nanochat/scaling.py set the horizon, batch size,
learning rates and weight decay from it, and every one of them can be overridden by a flag.
The resolved table is printed at start. (The `--` stops torchrun from parsing the script's flags:
it would read `--run` as its own `--run-path`.)
"""

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist

from nanochat import scaling
from nanochat.checkpoint import (CheckpointError, load_meta, load_model_weights, load_rank_state, resolve_step,
                                 save_checkpoint, step_dir)
from nanochat.common import (COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, cleanup_dist, get_base_dir, init_dist, peak_flops,
                             print0, synchronize)
from nanochat.attention import select_backend
from nanochat.core_eval import BundleError, evaluate_core, get_eval_bundle
from nanochat.dataloader import DataLoader
from nanochat.fp8 import convert_to_fp8, disable_fp8, fp8_supported
from nanochat.dataset import DataError, list_parquet_files, resolve_data_dir, split_files
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.loss_scale import DynamicLossScaler
from nanochat.report import RunLog, diagnose_low_mfu, model_flops_utilization
from nanochat.tokenizer import get_tokenizer, tokenizer_signature

GC_COLLECT_EVERY = 5000  # NOTES: a collection costs ~500 ms on a long run; do it rarely by hand


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain a nanochat GPT.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # run and logging
    p.add_argument("--run", default="dummy", help="wandb run name; 'dummy' logs only to the local JSONL")
    p.add_argument("--run-dir", default="", help="where log.jsonl, run.json and checkpoints go (default: <base>/runs/<run or d<depth>>)")
    p.add_argument("--device-type", default="", help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--seed", type=int, default=42, help="seed for weight init")
    p.add_argument("--data-seed", type=int, default=0, help="permute the train row-group order with this seed (0: file order)")
    # model
    p.add_argument("--depth", type=int, default=20, help="number of layers; sets every other model dimension")
    p.add_argument("--aspect-ratio", type=int, default=64, help="width = depth * aspect-ratio, rounded up to the head dim")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length T")
    p.add_argument("--window-pattern", default="SSSL", help="sliding-window pattern over layers (S short, L long; last layer long)")
    # horizon (first one set wins: num-iterations, target-flops, target-param-data-ratio)
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: derive from flops or ratio)")
    p.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: use the ratio)")
    p.add_argument("--target-param-data-ratio", type=float, default=scaling.DEFAULT_PARAM_DATA_RATIO,
                   help="training tokens per Kaplan-style parameter")
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per device per micro-step")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (-1: B_opt from the scaling law)")
    # optimizer
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR at batch 2^19 (scaled by sqrt(B/2^19))")
    p.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW LR of token/value embeddings at batch 2^19")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the lm_head at batch 2^19")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR of the per-layer scalars at batch 2^19")
    p.add_argument("--weight-decay", type=float, default=-1.0, help="cautious weight decay (-1: 0.22 * (768/width)^2)")
    p.add_argument("--warmup-steps", type=int, default=40, help="linear LR warmup steps")
    p.add_argument("--warmdown-frac", type=float, default=0.65, help="fraction of training spent in linear warmdown")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the end as a fraction of peak")
    # systems
    p.add_argument("--compile", type=int, default=1, help="torch.compile the model (1) or run eager (0)")
    p.add_argument("--fp8", action="store_true", help="FP8 matmuls in the blocks' linears (needs --compile 1; Hopper/Ada GPUs)")
    # evaluation
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (and at the end); -1 only at the end")
    p.add_argument("--eval-tokens", type=int, default=10 * 2**19, help="validation tokens per bpb evaluation (at most one pass over the val split)")
    p.add_argument("--core-metric-every", type=int, default=-1, help="CORE every N steps (-1: only at the end; 0: never)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="items per CORE task (-1: all)")
    p.add_argument("--eval-bundle", default="", help="CORE bundle: local dir or zip (default: download once to the cache)")
    p.add_argument("--sample-every", type=int, default=-1, help="print greedy samples every N steps (-1: only at the end; 0: never)")
    # data and checkpoints
    p.add_argument("--data-dir", default="", help="directory of parquet shards with a 'text' column (default: $NANOCHAT_DATA_DIR or <base>/base_data)")
    p.add_argument("--tokenizer-dir", default="", help="trained tokenizer (default: <base>/tokenizer; make it with scripts.tok_train)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end; 0: never)")
    p.add_argument("--resume-from-step", default="", help="resume from this checkpoint step of --run-dir, or 'latest'")
    args = p.parse_args(argv)
    if args.depth <= 0:
        p.error(f"--depth must be a positive integer, got {args.depth}")
    if args.fp8 and not args.compile:
        p.error("--fp8 needs --compile 1: without torch.compile the unfused scaling ops make FP8 ~4x slower than bf16")
    return args


# -----------------------------------------------------------------------------
# hyperparameters

def resolve_hyperparameters(args, model, world_size):
    """Every auto value from the scaling laws, with flag overrides. Returns a dict (the printed table)."""
    n_scaling = model.num_scaling_params()
    flops_per_token = model.estimate_flops()
    ratio_tokens = scaling.training_tokens(n_scaling, args.target_param_data_ratio)
    total_batch = args.total_batch_size if args.total_batch_size > 0 else scaling.optimal_batch_tokens(ratio_tokens, model.config.vocab_size)
    if args.num_iterations > 0:
        num_iterations, horizon = args.num_iterations, "--num-iterations"
    elif args.target_flops > 0:
        num_iterations, horizon = round(args.target_flops / (flops_per_token * total_batch)), "--target-flops"
    else:
        num_iterations, horizon = round(ratio_tokens / total_batch), f"ratio {args.target_param_data_ratio}"
    num_iterations = max(1, num_iterations)
    tokens_per_micro_step = args.device_batch_size * args.max_seq_len * world_size
    if total_batch % tokens_per_micro_step:
        raise SystemExit(f"--total-batch-size {total_batch} is not divisible by device-batch-size x seq-len x world-size = "
                         f"{args.device_batch_size} x {args.max_seq_len} x {world_size} = {tokens_per_micro_step}; "
                         "pick a total batch that is a multiple of it (or change --device-batch-size)")
    lr_scale = scaling.lr_batch_scale(total_batch)
    width = model.config.n_embd
    return {
        "depth": model.config.n_layer, "width": width, "heads": model.config.n_head, "seq_len": model.config.sequence_len,
        "vocab_size": model.config.vocab_size, "params_total": sum(p.numel() for p in model.parameters()),
        "params_scaling": n_scaling, "flops_per_token": flops_per_token,
        "total_batch_tokens": total_batch, "grad_accum_steps": total_batch // tokens_per_micro_step,
        "num_iterations": num_iterations, "horizon_from": horizon,
        "training_tokens": num_iterations * total_batch, "tokens_per_param": num_iterations * total_batch / n_scaling,
        "training_flops": flops_per_token * num_iterations * total_batch,
        "lr_batch_scale": lr_scale,
        "matrix_lr": args.matrix_lr * lr_scale, "embedding_lr": args.embedding_lr * lr_scale,
        "unembedding_lr": args.unembedding_lr * lr_scale, "scalar_lr": args.scalar_lr * lr_scale,
        "weight_decay": args.weight_decay if args.weight_decay >= 0 else scaling.weight_decay_for_width(width),
        "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
    }


def format_table(hp):
    rows = []
    for key, value in hp.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
        elif isinstance(value, int) and value >= 10**12:
            value = f"{value:.3e}"
        elif isinstance(value, int) and value >= 10_000:
            value = f"{value:,}"
        rows.append(f"  {key:<20} {value}")
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# building the run (also used by scripts/preflight.py, so it checks exactly what training runs)

def build_config(args, vocab_size):
    return GPTConfig.from_depth(args.depth, vocab_size=vocab_size, sequence_len=args.max_seq_len,
                                aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, window_pattern=args.window_pattern)


def run_name(args):
    """The wandb run name, or d<depth> for the dummy (no-wandb) run."""
    return args.run if args.run != "dummy" else f"d{args.depth}"


def default_run_dir(args):
    """--run-dir, else <base>/runs/<run name>."""
    return args.run_dir or os.path.join(get_base_dir(), "runs", run_name(args))


def build_model(args, vocab_size, device):
    return GPT.build(build_config(args, vocab_size), device, seed=args.seed)


def build_optimizer(model, hp, args):
    return model.setup_optimizer(matrix_lr=hp["matrix_lr"], embedding_lr=hp["embedding_lr"],
                                 unembedding_lr=hp["unembedding_lr"], scalar_lr=hp["scalar_lr"],
                                 weight_decay=hp["weight_decay"], compiled=bool(args.compile))


def train_step(model, compiled, optimizer, scaler, batches, grad_accum):
    """One optimizer step over grad_accum micro-batches from the iterator `batches`.

    Returns (mean loss tensor, seconds waiting in next(batches), seconds in the optimizer incl.
    gradient sync, whether the step was skipped for an inf/NaN, mean crop fraction or None when
    the batches carry no loader statistics). Schedules are set by the caller before it.
    """
    device = next(model.parameters()).device
    data_wait_s, crop, loss_sum = 0.0, 0.0, 0.0
    for _ in range(grad_accum):
        t0 = time.perf_counter()
        x, y = next(batches)
        data_wait_s += time.perf_counter() - t0
        stats = getattr(batches, "last_stats", None)  # the DataLoader's; synthetic batches have none
        crop = None if stats is None else crop + stats["crop_fraction"] / grad_accum
        loss = compiled(x, y)
        loss_sum = loss_sum + loss.detach() / grad_accum
        scaler.scale_loss(loss / grad_accum).backward()
    synchronize(device)
    t0 = time.perf_counter()
    found_inf = scaler.unscale_and_check(model.parameters())
    if not found_inf:
        optimizer.step()
    scaler.update(found_inf)
    model.zero_grad(set_to_none=True)
    synchronize(device)
    return loss_sum, data_wait_s, time.perf_counter() - t0, found_inf, crop


# -----------------------------------------------------------------------------
# pieces of the loop

def manage_gc(steps_done_here):
    """Python's GC stalls ~500 ms per collection on a long run: after the first step, freeze what exists and stop it."""
    if steps_done_here == 1:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif steps_done_here % GC_COLLECT_EVERY == 0:
        gc.collect()


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def data_signature(args, tokenizer, val_files, eval_tokens):
    """What a val bpb depends on besides the model: runs may be compared only when these match."""
    return {
        "tokenizer": tokenizer_signature(tokenizer), "vocab_size": tokenizer.vocab_size,
        "sequence_len": args.max_seq_len, "packing": "stream-order-bos-one-pass",  # how the val rows are built
        "val_data": [f"{os.path.basename(f)}:{os.path.getsize(f)}" for f in val_files], "eval_tokens": eval_tokens,
    }


def warm_up(compiled, model, optimizer, args, device, scaler):
    """Compile everything the loop runs, on every rank, before the first real step; then a barrier.

    A train forward/backward, an eval forward (FP8 off, as eval runs it) and one optimizer step
    at lr 0 on zero gradients (it compiles the update functions and runs every collective once),
    after which the optimizer state is restored exactly. No rank then reaches a collective with a
    cold compile cache while the others wait (NOTES: the watchdog kills multi-node jobs that do).
    """
    idx = torch.zeros(args.device_batch_size, args.max_seq_len, dtype=torch.long, device=device)
    scaler.scale_loss(compiled(idx, idx)).backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), disable_fp8(model):
        compiled(idx, idx, loss_reduction="none")
    saved = optimizer.state_dict()
    saved["state"] = {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()}
    optimizer.update_hparams(lr_multiplier=0.0)  # p - 0 * update == p exactly (the update is finite: zero grads)
    optimizer.step()
    optimizer.load_state_dict(saved)
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    run_start = time.time()
    dist_info = init_dist(args.device_type or None)
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    master = dist_info.is_master

    # tokenizer and data: fail before building anything if either is missing
    tokenizer = get_tokenizer(args.tokenizer_dir or None)
    data_dir = resolve_data_dir(args.data_dir or None)
    _, val_files = split_files(list_parquet_files(data_dir))
    core_bundle = resolve_core_bundle(args)

    model = build_model(args, tokenizer.vocab_size, device)
    config = model.config
    hp = resolve_hyperparameters(args, model, world_size)
    optimizer = build_optimizer(model, hp, args)
    scaler = DynamicLossScaler(enabled=COMPUTE_DTYPE == torch.float16)
    if args.fp8:
        ok, why = fp8_supported(device)
        if not ok:
            raise SystemExit(f"--fp8: {why}")
        print0(f"FP8: {convert_to_fp8(model)} linears converted to tensorwise-scaled Float8Linear ({why})")
    compiled = torch.compile(model, dynamic=False) if args.compile else model

    run_dir = default_run_dir(args)
    checkpoint_root = os.path.join(run_dir, "checkpoints")

    # state of the loop itself: everything a resume needs besides model, optimizer and loader
    loop = {"step": 0, "total_training_time": 0.0, "smooth_loss": 0.0, "min_val_bpb": float("inf")}
    loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, split="train", data_dir=data_dir,
                        rank=rank, world_size=world_size, device=device, data_seed=args.data_seed)
    if args.resume_from_step:
        step = resolve_step(checkpoint_root, args.resume_from_step)
        ckpt_dir = step_dir(checkpoint_root, step)
        meta = load_meta(ckpt_dir)
        if meta["model_config"] != config.to_dict():
            raise CheckpointError(f"{ckpt_dir} holds a model of config {meta['model_config']}, this run builds "
                                  f"{config.to_dict()}: pass the same --depth/--max-seq-len/--aspect-ratio/--head-dim")
        load_model_weights(model, ckpt_dir)
        state = load_rank_state(ckpt_dir, rank, world_size)
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
        loop = meta["loop_state"]
        print0(f"resumed from {ckpt_dir} at step {loop['step']}")

    eval_tokens_per_step = args.device_batch_size * args.max_seq_len * world_size
    eval_steps = max(1, args.eval_tokens // eval_tokens_per_step)
    peak, peak_source = peak_flops(device)
    attn_backend, attn_reason = select_backend(device, COMPUTE_DTYPE)
    print0(f"compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON}) | attention: {attn_reason}")
    print0(f"peak FLOP/s per device: {peak:.3e} ({peak_source})" if peak else f"peak FLOP/s unknown ({peak_source}): MFU not reported")
    print0(f"world size {world_size} | device {device} | run dir {run_dir}")
    print0("resolved hyperparameters:\n" + format_table(hp))

    run_info = {"args": vars(args), "hyperparameters": hp, "model_config": config.to_dict(),
                "data_signature": data_signature(args, tokenizer, val_files, eval_steps * eval_tokens_per_step),
                "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "world_size": world_size, "peak_flops": peak, "attention": attn_backend}}
    log = RunLog(run_dir, run_name(args), run_info, use_wandb=args.run != "dummy",
                 resume_step=loop["step"] if args.resume_from_step else None, enabled=master)

    warm_up(compiled, model, optimizer, args, device, scaler)
    token_bytes = tokenizer.token_bytes().to(device)
    num_iterations, grad_accum = hp["num_iterations"], hp["grad_accum_steps"]
    flops_per_token, total_batch = hp["flops_per_token"], hp["total_batch_tokens"]
    recent_mfu = []
    start_step = loop["step"]

    def due(every, step):
        """Periodic work at this step? Never at step 0, nor again at the step a resume starts from."""
        return every > 0 and step % every == 0 and step > start_step

    while True:
        step = loop["step"]
        last = step == num_iterations
        progress = {"step": step, "total_training_flops": flops_per_token * total_batch * step,
                    "total_training_time": loop["total_training_time"]}
        if last or due(args.eval_every, step) or (step == 0 and args.eval_every > 0):
            # stream-order packing + one pass: a val split smaller than --eval-tokens is counted once, not re-looped
            with torch.no_grad(), disable_fp8(model), DataLoader(
                    tokenizer, args.device_batch_size, args.max_seq_len, split="val", data_dir=data_dir,
                    rank=rank, world_size=world_size, device=device, packer="greedy") as val_batches:
                val_bpb = evaluate_bpb(compiled, val_batches.one_pass(), eval_steps, token_bytes)
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            log.log({**progress, "val/bpb": val_bpb})
        # save before CORE and sampling: whatever they do, the trained weights are already on disk
        if args.save_every != 0 and step > start_step and (last or due(args.save_every, step)):
            meta = {"model_config": config.to_dict(), "args": vars(args), "hyperparameters": hp, "loop_state": loop}
            rank_state = {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                          "scaler": scaler.state_dict(), "rng": rng_state(device)}
            path = save_checkpoint(checkpoint_root, step, model, rank_state, meta, rank, world_size)
            print0(f"saved checkpoint {path}")
        if core_bundle and (last or due(args.core_metric_every, step)):
            core = run_core(model, tokenizer, core_bundle, args, device, config)
            log.log({**progress, "core_metric": core["core_metric"], **{f"core/{k}": v for k, v in core["centered"].items()}})
        if args.sample_every != 0 and (last or due(args.sample_every, step)) and master:
            print_samples(model, tokenizer)
        if last:
            break

        # ---- one optimizer step -------------------------------------------------
        lrm = scaling.lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_frac, args.final_lr_frac)
        optimizer.update_hparams(lr_multiplier=lrm, weight_decay_multiplier=scaling.weight_decay_multiplier(step, num_iterations),
                                 muon_momentum=scaling.muon_momentum(step))
        synchronize(device)
        t0 = time.perf_counter()
        train_loss, data_wait_s, optim_s, found_inf, crop = train_step(model, compiled, optimizer, scaler, loader, grad_accum)
        train_loss = train_loss.item()  # syncs the device
        dt = time.perf_counter() - t0

        loop["step"] = step = step + 1
        manage_gc(step - start_step)
        if step > 1:  # the first step carries one-off costs (allocator, lazy init)
            loop["total_training_time"] += dt
        beta = 0.9
        loop["smooth_loss"] = beta * loop["smooth_loss"] + (1 - beta) * train_loss
        smooth = loop["smooth_loss"] / (1 - beta ** step)
        tok_per_s = total_batch / dt
        mfu = model_flops_utilization(flops_per_token, tok_per_s, peak, world_size)
        done_frac = step / num_iterations
        eta_s = (num_iterations - step) * loop["total_training_time"] / max(1, step - 1)
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
        print0(f"step {step:05d}/{num_iterations:05d} ({done_frac:.1%}) | loss {smooth:.4f} | lrm {lrm:.2f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu {mfu_text} | eta {eta_s / 60:.1f}m"
               + (" | inf: step skipped" if found_inf else ""))
        log.log({"step": step, "train/loss": train_loss, "train/loss_smooth": smooth, "train/lrm": lrm, "train/dt": dt,
                 "train/dt_data": data_wait_s, "train/dt_optim": optim_s, "train/tok_per_sec": tok_per_s,
                 "train/mfu": mfu, "train/crop_fraction": crop, "train/skipped": found_inf,
                 "total_training_flops": flops_per_token * total_batch * step,
                 "total_training_time": loop["total_training_time"]})
        recent_mfu.append((mfu, data_wait_s / dt, optim_s / dt))
        if device.type == "cuda" and step % 100 == 0 and mfu is not None:
            window = recent_mfu[-50:]
            mean = [sum(v[i] for v in window) / len(window) for i in range(3)]
            diagnosis = diagnose_low_mfu(*mean, args.device_batch_size * args.max_seq_len)
            if diagnosis:
                print0(f"WARNING: {diagnosis}")

    print0(f"done: {loop['step']} steps, min val bpb {loop['min_val_bpb']:.4f}, "
           f"training time {loop['total_training_time'] / 60:.2f}m, wall {(time.time() - run_start) / 60:.2f}m")
    if device.type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    log.finish()
    loader.close()
    cleanup_dist()
    return loop


def resolve_core_bundle(args):
    """The CORE bundle directory, fetched now: an offline run must learn at startup, not after training.
    A bundle the user named must work; the default one (a download) may not, and then CORE is off."""
    if args.core_metric_every == 0:
        return None
    try:
        return get_eval_bundle(args.eval_bundle or None)
    except BundleError as e:
        if args.eval_bundle:
            raise
        print0(f"WARNING: CORE is off for this run: {e}")
        return None


def run_core(model, tokenizer, bundle, args, device, config):
    with torch.no_grad(), disable_fp8(model):
        return evaluate_core(model, tokenizer, bundle, device, config.sequence_len,
                             max_per_task=args.core_metric_max_per_task, print_fn=print0)


def print_samples(model, tokenizer, prompts=("The capital of France is", "In the beginning", "The meaning of life is")):
    with disable_fp8(model):
        for prompt in prompts:
            ids = tokenizer.encode(prompt, prepend_bos=True)
            print0(f"sample: {prompt!r} -> {tokenizer.decode(list(model.generate(ids, 16)))!r}")


if __name__ == "__main__":
    try:
        main()
    except (BundleError, CheckpointError, DataError, FileNotFoundError) as e:  # bad input: the message says what to do
        raise SystemExit(f"base_train: {e}") from None
