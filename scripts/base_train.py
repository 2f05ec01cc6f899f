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
import math
import os
import shlex
import shutil
import sys
import time

import torch
import torch.distributed as dist

from nanochat import memory_plan, scaling
from nanochat.checkpoint import (CheckpointError, checkpoint_bytes, free_bytes, list_steps, load_meta, load_model_weights,
                                 load_rank_state, resolve_step, save_checkpoint, step_dir)
from nanochat.cli import ArgumentParser, number, run_main
from nanochat.common import (COMPUTE_DTYPE, COMPUTE_DTYPE_REASON, across_ranks, cleanup_dist, get_base_dir, init_dist,
                             peak_flops, print0, synchronize)
from nanochat.attention import sdpa_window_notice, select_backend
from nanochat.core_eval import BundleError, evaluate_core, get_eval_bundle
from nanochat.dataloader import DataLoader
from nanochat.fp8 import convert_to_fp8, disable_fp8, fp8_supported
from nanochat.dataset import DataError
from nanochat.gpt import C_FC_INIT_SCALE, GPT, GPTConfig
from nanochat.guards import SpikeDetector, TrainingDiverged, check_finite, divergence_hint, nonfinite_loss_ranks
from nanochat.loss_eval import evaluate_bpb
from nanochat.loss_scale import DynamicLossScaler
from nanochat.mixture import SPEC_HELP, TEXT_COLUMN, check_sources, resolve_sources, shares, val_identity
from nanochat.preemption import PreemptionHandler
from nanochat.report import RunLog, diagnose_low_mfu, model_flops_utilization
from nanochat.runs import RunDirError, RunDirLock, describe_holder, new_run_name, runs_root, timestamp_name
from nanochat.tokenizer import TokenizerError, get_tokenizer, tokenizer_signature

GC_COLLECT_EVERY = 5000  # NOTES: a collection costs ~500 ms on a long run; do it rarely by hand
# How every val bpb evaluation builds its rows: stream-order packing (each document once, BOS-aligned,
# cropped) read in one pass, so a val split smaller than --eval-tokens is counted once, not re-looped.
# data_signature() is derived from it: runs evaluated another way are never compared.
VAL_PACKER = "greedy"
# Bad input the loop can meet (a missing or damaged file, a wrong resume, a busy run dir) and a diverged run:
# one line that says what to do, no traceback.
BAD_INPUT_ERRORS = (BundleError, CheckpointError, DataError, RunDirError, TokenizerError, TrainingDiverged)
DISK_CHECK_EVERY = 100  # steps between free-space checks (a statfs: cheap, but slow on some network filesystems)


def parse_args(argv=None):
    """The flags, each range-checked while parsing: a bad value is one line on stderr before anything is built."""
    p = ArgumentParser(description="Pretrain a nanochat GPT.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    count, auto_count = number(int, low=1), number(int, low=1, also=(-1,))  # -1: derive it
    every = number(int, low=-1)  # N > 0: every N steps; -1: only at the end; 0: never (eval: only at the end)
    rate = number(float, low=0.0)
    # run and logging
    p.add_argument("--run", default="", help="the run's name: its directory under <base>/runs and its wandb name; wandb "
                   "logs only when a name is given (WANDB_MODE=offline/disabled as usual) (default: d<depth>-<start time>, no wandb)")
    p.add_argument("--run-dir", default="", help="where log.jsonl, run.json and checkpoints go (default: <base>/runs/<run name>)")
    p.add_argument("--overwrite", action="store_true", help="start afresh on a run dir that holds checkpoints, deleting them "
                   "(without it such a dir is refused unless --resume-from-step is given)")
    p.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--seed", type=number(int, low=0, high=2**63 - 1), default=42, help="seed for weight init")
    p.add_argument("--data-seed", type=number(int, low=0), default=0, help="permute the train row-group order with this seed (0: file order)")
    # model
    p.add_argument("--depth", type=count, default=20, help="number of layers; sets every other model dimension")
    p.add_argument("--aspect-ratio", type=count, default=64, help="width = depth * aspect-ratio, rounded up to the head dim")
    p.add_argument("--head-dim", type=count, default=128, help="attention head dimension")
    p.add_argument("--max-seq-len", type=count, default=2048, help="context length T")
    p.add_argument("--window-pattern", default="SSSL", help="sliding-window pattern over layers (S short, L long; last layer long)")
    # horizon (first one set wins: num-iterations, target-flops, target-param-data-ratio)
    p.add_argument("--num-iterations", type=auto_count, default=-1, help="optimizer steps (-1: derive from flops or ratio)")
    p.add_argument("--target-flops", type=number(float, low=1.0, also=(-1.0,)), default=-1.0, help="training FLOPs budget (-1: use the ratio)")
    p.add_argument("--target-param-data-ratio", type=number(float, low=1e-6), default=scaling.DEFAULT_PARAM_DATA_RATIO,
                   help="training tokens per Kaplan-style parameter")
    # batch
    batch_or_auto = lambda text: 0 if text == "auto" else count(text)  # 0: auto, resolved by main() once the model exists
    p.add_argument("--device-batch-size", type=batch_or_auto, default=32,
                   help="sequences per device per micro-step; 'auto': the largest power of two whose memory plan "
                        "(nanochat/memory_plan.py, with its margin) fits the device (system RAM on CPU)")
    p.add_argument("--total-batch-size", type=auto_count, default=-1, help="tokens per optimizer step (-1: B_opt from the scaling law)")
    # optimizer
    p.add_argument("--matrix-lr", type=rate, default=0.02, help="Muon LR at batch 2^19 (x sqrt(B/2^19) above it, the same below: scaling.lr_batch_scale)")
    p.add_argument("--embedding-lr", type=rate, default=0.3, help="AdamW LR of token/value embeddings at batch 2^19")
    p.add_argument("--unembedding-lr", type=rate, default=0.008, help="AdamW LR of the lm_head at batch 2^19")
    p.add_argument("--scalar-lr", type=rate, default=0.5, help="AdamW LR of the per-layer scalars at batch 2^19")
    p.add_argument("--gate-lr", type=rate, default=0.2, help="AdamW LR of the smear gate and smear/backout lambdas (not scaled with the batch: RECIPE)")
    p.add_argument("--weight-decay", type=number(float, low=0.0, also=(-1.0,)), default=-1.0, help="Muon's cautious weight decay (-1: T_epoch rule 0.28 * sqrt(B/2^19) * N_d12/N)")
    p.add_argument("--smear", type=int, default=1, choices=[0, 1], help="smear (1) or its leave-one-out (0: its lambda stays 0, GPT.freeze_smear)")
    p.add_argument("--c-fc-init-scale", type=number(float, low=0.0), default=C_FC_INIT_SCALE, help="c_fc's uniform init as a fraction of the 1/sqrt(fan_in) bound (RECIPE 0.4; 1.0 is the plain bound)")
    p.add_argument("--norm-gains", type=int, default=0, choices=[0, 1], help="selective RMSNorm scales (PR #830): learnable gains on the pre-MLP and final norms (1) or none (0)")
    p.add_argument("--muon-eq", type=int, default=1, choices=[0, 1], help="MuonEq: equalise row norms before orthogonalising (1) or not (0)")
    p.add_argument("--muon-plus", type=int, default=1, choices=[0, 1], help="Muon+: rescale the orthogonalised update to sqrt(min(rows, cols)) (1) or not (0)")
    p.add_argument("--momentum-ramp-first", type=int, default=0, choices=[0, 1],
                   help="Muon momentum in runs under ~600 steps: 0 = the warmdown's fall to 0.90 starts from wherever the "
                        "0.85->0.97 ramp is; 1 = the reference's order, the 400-step ramp first (scaling.muon_momentum)")
    p.add_argument("--warmup-steps", type=number(int, low=0, also=(-1,)), default=-1,
                   help="linear LR warmup steps (-1: the record's 40 from 2^19 tokens per step up, 0 below: "
                        "scaling.default_warmup_steps)")
    p.add_argument("--warmdown-frac", type=number(float, low=0.0, high=1.0), default=0.65, help="fraction of training spent in linear warmdown")
    p.add_argument("--final-lr-frac", type=number(float, low=0.0, high=1.0), default=0.05, help="LR at the end as a fraction of peak")
    # systems
    p.add_argument("--compile", type=int, default=1, choices=[0, 1], help="torch.compile the model (1) or run eager (0)")
    p.add_argument("--fp8", action="store_true", help="FP8 matmuls in the blocks' linears (needs --compile 1; Hopper/Ada GPUs)")
    # evaluation
    p.add_argument("--eval-every", type=every, default=250, help="val bpb every N steps (and at the end); -1 only at the end")
    p.add_argument("--eval-tokens", type=count, default=10 * 2**19, help="validation tokens per bpb evaluation, per source of a mixture (at most one pass over each val split)")
    p.add_argument("--core-metric-every", type=every, default=-1, help="CORE every N steps (-1: only at the end; 0: never)")
    p.add_argument("--core-metric-max-per-task", type=auto_count, default=500, help="items per CORE task (-1: all)")
    p.add_argument("--eval-bundle", default="", help="CORE bundle: local dir or zip (default: download once to the cache)")
    p.add_argument("--sample-every", type=every, default=-1, help="print greedy samples every N steps (-1: only at the end; 0: never)")
    # data and checkpoints
    p.add_argument("--data-dir", default="", help="directory of parquet shards with a 'text' column (default: $NANOCHAT_DATA_DIR or <base>/base_data)")
    p.add_argument("--data", default="", help=SPEC_HELP)
    p.add_argument("--text-column", default=TEXT_COLUMN, help="text column of every source that names none (SOURCE@COLUMN)")
    p.add_argument("--tokenizer-dir", default="", help="trained tokenizer (default: <base>/tokenizer; make it with scripts.tok_train)")
    p.add_argument("--save-every", type=every, default=-1, help="checkpoint every N steps (-1: only at the end; 0: never)")
    p.add_argument("--dry-run", type=number(int, low=0), default=0, help="print the resolved hyperparameters of this run on N ranks "
                   "(model on the meta device, no data, no training) and exit; 0: train")
    p.add_argument("--resume-from-step", default="", help="resume from this checkpoint step of the run (--run or --run-dir), or 'latest' (default: start afresh)")
    p.add_argument("--allow-horizon-change", action="store_true", help="resume with a --num-iterations (or other horizon) "
                   "different from the checkpoint's: the LR schedule changes from the resumed step on")
    args = p.parse_args(argv)
    if args.fp8 and not args.compile:
        p.error("--fp8 needs --compile 1: without torch.compile the unfused scaling ops make FP8 ~4x slower than bf16")
    if args.head_dim % 2:
        p.error(f"--head-dim must be even (rotary embeddings turn pairs of dimensions), got {args.head_dim}")
    if args.norm_gains and COMPUTE_DTYPE == torch.float16:
        p.error("--norm-gains 1 does not run in fp16 (the fused loss's fp16 chunking assumes gain-free final norms): "
                "use NANOCHAT_DTYPE=bfloat16 or float32")
    if not args.window_pattern or set(args.window_pattern.upper()) - set("SL"):
        p.error(f"--window-pattern {args.window_pattern!r} must be a non-empty string of S and L, e.g. SSSL")
    if args.resume_from_step not in ("", "latest") and not args.resume_from_step.isdigit():
        p.error(f"--resume-from-step takes a step number or 'latest', got {args.resume_from_step!r}")
    if args.resume_from_step and not (args.run or args.run_dir):
        p.error("--resume-from-step needs the run to resume: --run NAME or --run-dir PATH")
    if args.resume_from_step and args.overwrite:
        p.error("--overwrite starts afresh and --resume-from-step continues: pass one of them")
    if args.run and (os.sep in args.run or args.run in (".", "..")):
        p.error(f"--run {args.run!r} is a name, not a path: pass a path as --run-dir")
    for flag in ("run_dir", "data_dir", "tokenizer_dir"):
        path = getattr(args, flag)
        if path and os.path.exists(path) and not os.path.isdir(path):
            p.error(f"--{flag.replace('_', '-')} {path} is a file, not a directory")
    check_device_type(p, args.device_type)
    return args


def check_device_type(parser, device_type):
    """A device the user named must exist here: otherwise the run would die deep in init with a traceback."""
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device-type cuda: no CUDA device is visible (check nvidia-smi / CUDA_VISIBLE_DEVICES), "
                     "or pass --device-type cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        parser.error("--device-type mps: MPS is not available on this machine; pass --device-type cpu")


# -----------------------------------------------------------------------------
# hyperparameters

def resolved_total_batch(args, model):
    """Tokens per optimizer step: --total-batch-size, else the batch law anchored on the d12 of the run's shape."""
    if args.total_batch_size > 0:
        return args.total_batch_size
    return scaling.optimal_batch_tokens(model.num_scaling_params(), model.config.vocab_size,
                                        aspect_ratio=args.aspect_ratio, head_dim=args.head_dim)


def resolve_hyperparameters(args, model, world_size):
    """Every auto value from the scaling laws, with flag overrides. Returns a dict (the printed table)."""
    n_scaling = model.num_scaling_params()
    flops_per_token = model.estimate_flops()
    ratio_tokens = scaling.training_tokens(n_scaling, args.target_param_data_ratio)
    shape = dict(aspect_ratio=args.aspect_ratio, head_dim=args.head_dim)  # the d12 anchor has the run's own shape
    n_anchor = scaling.anchor_params(model.config.vocab_size, **shape)
    total_batch = resolved_total_batch(args, model)
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
    # Muon's LR per matrix shape: x max(1, rows/cols)^0.5 inside the step (c_fc: x2)
    muon_lrs = {f"{r}x{c}": args.matrix_lr * lr_scale * max(1.0, r / c) ** 0.5
                for r, c in sorted({tuple(p.shape) for p in model.blocks.parameters()}, reverse=True)}
    return {
        "depth": model.config.n_layer, "width": width, "heads": model.config.n_head, "seq_len": model.config.sequence_len,
        "vocab_size": model.config.vocab_size, "params_total": sum(p.numel() for p in model.parameters()),
        "params_scaling": n_scaling, "params_d12_anchor": n_anchor, "flops_per_token": flops_per_token,
        "total_batch_tokens": total_batch, "grad_accum_steps": total_batch // tokens_per_micro_step,
        "num_iterations": num_iterations, "horizon_from": horizon,
        "training_tokens": num_iterations * total_batch, "tokens_per_param": num_iterations * total_batch / n_scaling,
        "training_flops": flops_per_token * num_iterations * total_batch,
        "lr_batch_scale": lr_scale,
        "matrix_lr": args.matrix_lr * lr_scale, **{f"muon_lr_{shape}": lr for shape, lr in muon_lrs.items()},
        "embedding_lr": args.embedding_lr * lr_scale,
        "unembedding_lr": args.unembedding_lr * lr_scale, "scalar_lr": args.scalar_lr * lr_scale,
        "gate_lr": args.gate_lr,  # RECIPE's 0.2 is unscaled from 2^19 up; below, every LR holds its 2^19 value
        # what the AdamW groups get after setup_optimizer's width scale (n/768)^-0.5 (RECIPE's d24 column)
        "wte_lr_effective": args.embedding_lr * lr_scale * (width / 768) ** -0.5,
        "lm_head_lr_effective": args.unembedding_lr * lr_scale * (width / 768) ** -0.5,
        "warmup_steps": args.warmup_steps if args.warmup_steps >= 0 else scaling.default_warmup_steps(total_batch),
        "weight_decay": (args.weight_decay if args.weight_decay >= 0
                         else scaling.muon_weight_decay(n_scaling, total_batch, model.config.vocab_size, **shape)),
        "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
    }


def extrapolation_note(hp, args):
    """A line when the batch and weight-decay laws run far below the d12 anchor they are fitted at, where their
    values look odd (d2 at vocab 512: WD 18.4, 65k tokens per step) because they are extrapolations; else None."""
    below = hp["params_d12_anchor"] / hp["params_scaling"]
    if below < 32 or (args.total_batch_size > 0 and args.weight_decay >= 0):
        return None
    return (f"note: this model is {below:.0f}x smaller than the d12 anchor of the batch and weight-decay laws, far "
            f"below where they were fitted (d12 up): weight_decay {hp['weight_decay']:.3g} and "
            f"{hp['total_batch_tokens']:,} tokens per step are extrapolations; set --weight-decay / --total-batch-size "
            "to choose them yourself")


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
                                aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, window_pattern=args.window_pattern,
                                norm_gains=bool(args.norm_gains))


def run_name(args):
    """--run; else the --run-dir's own name; else d<depth>-<now> (what a run started now would be called)."""
    if args.run or args.run_dir:
        return args.run or os.path.basename(os.path.normpath(args.run_dir))
    return timestamp_name(args.depth)


def default_run_dir(args, name=None):
    """--run-dir, else <base>/runs/<run name>."""
    return args.run_dir or os.path.join(runs_root(get_base_dir()), name or run_name(args))


def claim_run_dir(args, master):
    """(name, run dir) of this run. An unnamed run gets a new d<depth>-<start time> dir, created by rank 0 and
    broadcast (every rank must use the same one), so two unnamed runs never share a directory."""
    if args.run or args.run_dir:
        return run_name(args), default_run_dir(args)
    name = [new_run_name(get_base_dir(), args.depth) if master else None]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return name[0], default_run_dir(args, name[0])


def lock_run_dir(run_dir, args, checkpoint_root, master):
    """The run's lock (rank 0 holds it; every rank learns the outcome), and the refusal to start afresh on a
    dir that holds another run's checkpoints. Returns the lock, or None on other ranks."""
    lock, error = None, ""
    if master:
        try:
            lock = RunDirLock(run_dir).acquire()
            if lock.took_over:
                print0(f"note: took over the lock of {run_dir} left by a run that is no longer running "
                       f"({describe_holder(lock.took_over)})")
            steps = list_steps(checkpoint_root)
            if steps and not args.resume_from_step and not args.overwrite:
                lock.release()
                error = (f"{run_dir} already holds checkpoints (steps {steps[0]}..{steps[-1]}): continue it with "
                         f"--resume-from-step latest, start afresh with --overwrite (deletes them), or pick another --run")
            elif steps and args.overwrite:
                shutil.rmtree(checkpoint_root)
                print0(f"--overwrite: deleted the checkpoints of {run_dir} (steps {steps[0]}..{steps[-1]})")
        except RunDirError as e:
            error = str(e)
    errors = [error]
    if dist.is_initialized():
        dist.broadcast_object_list(errors, src=0)
    if errors[0]:
        raise RunDirError(errors[0])
    return lock


def build_model(args, vocab_size, device):
    model = GPT.build(build_config(args, vocab_size), device, seed=args.seed, c_fc_init_scale=args.c_fc_init_scale)
    if not args.smear:
        model.freeze_smear()
    return model


def build_optimizer(model, hp, args):
    return model.setup_optimizer(matrix_lr=hp["matrix_lr"], embedding_lr=hp["embedding_lr"],
                                 unembedding_lr=hp["unembedding_lr"], scalar_lr=hp["scalar_lr"],
                                 gate_lr=hp["gate_lr"], weight_decay=hp["weight_decay"], muon_eq=bool(args.muon_eq),
                                 muon_plus=bool(args.muon_plus), compiled=bool(args.compile))


def train_step(model, compiled, optimizer, scaler, batches, grad_accum):
    """One optimizer step over grad_accum micro-batches from the iterator `batches`.

    Returns (mean loss tensor, seconds waiting in next(batches), seconds in the optimizer incl.
    gradient sync, whether the step was skipped for an inf/NaN gradient (fp16 loss scaling), mean
    crop fraction or None when the batches carry no loader statistics). Schedules are set by the
    caller before it. A non-finite loss on any rank raises TrainingDiverged on every rank before the
    optimizer runs: the weights stay as they were after the previous step.
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
    bad_ranks = nonfinite_loss_ranks(loss_sum)  # the loop already waits for backward here: no extra sync
    if bad_ranks:
        model.zero_grad(set_to_none=True)
        raise TrainingDiverged(", ".join(f"{kind} on rank {rank}" for rank, kind in bad_ranks.items()))
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


def resume_command(run_dir, step, argv=None):
    """The command line that continues this run from checkpoint `step`: this run's flags, the run dir spelled out.
    (argparse keeps the last of a repeated flag, so the appended ones win over any abbreviation in argv.)"""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg in ("--resume-from-step", "--run-dir"):
            skip_value = True
        elif not arg.startswith(("--resume-from-step=", "--run-dir=")):
            kept.append(arg)
    kept += ["--run-dir", os.path.abspath(run_dir), "--resume-from-step", str(step)]
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if world == 1:
        launcher = "python -m scripts.base_train"
    elif world == local:
        launcher = f"torchrun --standalone --nproc_per_node={local} -m scripts.base_train --"
    else:
        launcher = f"torchrun --nnodes={world // local} --nproc_per_node={local} <this run's rendezvous flags> -m scripts.base_train --"
    return f"{launcher} {shlex.join(kept)}"


def check_resumed_horizon(meta, hp, step, args, ckpt_dir):
    """A resume with another horizon changes the LR schedule from here on (and a finished run would train
    again): allowed only when asked for, and never to a horizon the checkpoint is already past."""
    saved = meta.get("hyperparameters", {}).get("num_iterations")
    new = hp["num_iterations"]
    if saved is None or saved == new:
        return
    if not args.allow_horizon_change:
        raise CheckpointError(f"{ckpt_dir} was saved by a run of {saved} steps and this one has {new} "
                              f"({hp['horizon_from']}): pass the same horizon flags, or --allow-horizon-change to "
                              "continue with the new horizon (the LR schedule changes from the resumed step on)")
    if step > new:
        raise CheckpointError(f"{ckpt_dir} is at step {step}, past the new horizon of {new} steps: pick a larger one")
    print0(f"horizon changed on resume: {saved} -> {new} steps (--allow-horizon-change)")


def optimizer_tensors(optimizer_state):
    """(name, tensor) for every tensor of an optimizer state_dict (the finite check before a save)."""
    return [(f"optimizer state {i}.{k}", v) for i, st in optimizer_state["state"].items()
            for k, v in st.items() if torch.is_tensor(v)]


def diverged_message(step, what, checkpoint_root, run_dir, args):
    """The one line a diverged run ends with: where, what, the last good checkpoint and how to go on."""
    steps = list_steps(checkpoint_root)
    if steps:
        go_on = (f"last good checkpoint: step {steps[-1]} ({step_dir(checkpoint_root, steps[-1])}); {divergence_hint(args)}, "
                 f"then resume with: {resume_command(run_dir, steps[-1])}")
    else:
        go_on = f"no checkpoint was saved (--save-every); {divergence_hint(args)}, then start again"
    return f"diverged at step {step}: {what} — {go_on}"


def format_duration(seconds):
    """Seconds below a minute, minutes below an hour, then hours: a 20 s run does not print 0.0m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 3600 else f"{seconds / 3600:.2f}h"


def format_bpb(bpb):
    return f"{bpb:.4f}" if math.isfinite(bpb) else "n/a (no evaluation ran)"


def disk_space_warning(checkpoint_root, need_bytes):
    """A warning line when the next checkpoint (need_bytes) does not fit in the free space, else None."""
    free = free_bytes(checkpoint_root)
    if free >= need_bytes:
        return None
    return (f"WARNING: a checkpoint needs {need_bytes:,} bytes but only {free:,} are free at {checkpoint_root}, so the next "
            "save will fail: free space there, or stop the run and resume it with its checkpoints moved to a bigger disk")


def data_signature(args, tokenizer, sources, eval_tokens):
    """What a val bpb depends on besides the model: runs may be compared only when these match.

    `data` is the mixture (sources, text columns, weights): the mixture val bpb weights the
    per-source ones by it, and a different training mixture is a different experiment."""
    return {
        "tokenizer": tokenizer_signature(tokenizer), "vocab_size": tokenizer.vocab_size,
        "sequence_len": args.max_seq_len, "packing": f"{VAL_PACKER}-one-pass",  # how the val rows are built
        "data": [s.describe() for s in sources],
        "val_data": [v for s in sources for v in val_identity(s)], "eval_tokens": eval_tokens,
    }


def evaluate_val(compiled, model, tokenizer, sources, args, rank, world_size, device, eval_steps, token_bytes):
    """{"val/bpb": ..., and with several sources "val/bpb/<name>" each}: each source's val split on its own.

    Stream-order packing + one pass: a val split smaller than --eval-tokens is counted once, not
    re-looped. The mixture's val bpb is the per-source bpb weighted by the mixture's shares."""
    bpb = {}
    with torch.no_grad(), disable_fp8(model):
        for source in sources:
            with DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, split="val", data=[source],
                            rank=rank, world_size=world_size, device=device, packer=VAL_PACKER) as val_batches:
                bpb[source.name] = evaluate_bpb(compiled, val_batches.one_pass(), eval_steps, token_bytes)
    if len(sources) == 1:
        return {"val/bpb": bpb[sources[0].name]}
    mixture = sum(share * bpb[s.name] for share, s in zip(shares(sources), sources))
    return {"val/bpb": mixture, **{f"val/bpb/{name}": value for name, value in bpb.items()}}


def warm_up(compiled, model, optimizer, args, device, scaler):
    """Compile everything the loop runs, on every rank, before the first real step; then a barrier.

    A train forward/backward, an eval forward (FP8 off, as eval runs it) and one optimizer step
    at lr 0 on zero gradients (it compiles the update functions and runs every collective once),
    after which the optimizer state is restored exactly. No rank then reaches a collective with a
    cold compile cache while the others wait (NOTES: the watchdog kills multi-node jobs that do).
    Inputs and targets are built like the DataLoader's: two distinct int64 views of one (2, B, T)
    block. Dynamo guards on aliasing: one tensor passed as both would compile a graph for
    `inputs is targets` that no real batch matches, and the first step and eval would recompile.
    """
    pair = torch.zeros((2, args.device_batch_size, args.max_seq_len), dtype=torch.long, device=device)
    inputs, targets = pair[0], pair[1]
    scaler.scale_loss(compiled(inputs, targets)).backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), disable_fp8(model):
        compiled(inputs, targets, loss_reduction="none")
    saved = optimizer.state_dict()
    saved["state"] = {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()}
    optimizer.update_hparams(lr_multiplier=0.0)  # p - 0 * update == p exactly (the update is finite: zero grads)
    optimizer.step()
    optimizer.load_state_dict(saved)
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------

def dry_run(args):
    """--dry-run N: the resolved table for N ranks from a model built on the meta device (no memory,
    no data); the vocab comes from the tokenizer when one is found, else the speedrun's 32768."""
    try:
        vocab_size, vocab_from = get_tokenizer(args.tokenizer_dir or None).vocab_size, "the tokenizer"
    except (FileNotFoundError, OSError):
        vocab_size, vocab_from = 32768, "no tokenizer found: the speedrun's default"
    with torch.device("meta"):
        model = GPT(build_config(args, vocab_size))
    args.device_batch_size, plan_lines = memory_plan.plan_device_batch(  # also resolves --device-batch-size auto
        model, args.device_batch_size, resolved_total_batch(args, model), args.dry_run, args.fp8,
        memory_plan.target_compute_dtype(), memory_plan.default_device())
    hp = resolve_hyperparameters(args, model, args.dry_run)
    # the table is for the N ranks of the run, not for this machine: their dtype, as the memory plan traces it
    target = str(memory_plan.target_compute_dtype()).removeprefix("torch.")
    if target != hp["compute_dtype"]:
        hp["compute_dtype"] = f"{target} (the GPU run's; this machine would run {hp['compute_dtype']})"
    print(f"dry run: {args.dry_run} rank(s), vocab {vocab_size} ({vocab_from})")
    print("resolved hyperparameters:\n" + format_table(hp))
    if extrapolation_note(hp, args):
        print(extrapolation_note(hp, args))
    print("\n".join(plan_lines))
    return hp


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run > 0:
        return dry_run(args)
    run_start = time.time()
    dist_info = init_dist(args.device_type or None)
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    master = dist_info.is_master

    # tokenizer and data: fail before building anything if either is missing
    tokenizer = get_tokenizer(args.tokenizer_dir or None)
    sources = resolve_sources(args.data, args.data_dir or None, args.text_column)
    check_sources(sources)
    core_bundle = resolve_core_bundle(args)
    # then the run's name and dir: bad input writes nothing, and a second run on a busy dir stops before building
    name, run_dir = claim_run_dir(args, master)
    checkpoint_root = os.path.join(run_dir, "checkpoints")
    run_lock = lock_run_dir(run_dir, args, checkpoint_root, master)
    print0(f"run {name} | run dir {run_dir}")

    model = build_model(args, tokenizer.vocab_size, device)
    config = model.config
    if args.device_batch_size == 0:  # --device-batch-size auto: the largest power of two whose memory plan fits
        args.device_batch_size, plan_lines = memory_plan.plan_device_batch(
            model, 0, resolved_total_batch(args, model), world_size, args.fp8, COMPUTE_DTYPE, device)
        print0("\n".join(plan_lines))
    hp = resolve_hyperparameters(args, model, world_size)
    optimizer = build_optimizer(model, hp, args)
    scaler = DynamicLossScaler(enabled=COMPUTE_DTYPE == torch.float16)
    if args.fp8:
        ok, why = fp8_supported(device)
        if not ok:
            raise SystemExit(f"--fp8: {why}")
        print0(f"FP8: {convert_to_fp8(model)} linears converted to tensorwise-scaled Float8Linear ({why})")
    compiled = torch.compile(model, dynamic=False) if args.compile else model

    # state of the loop itself: everything a resume needs besides model, optimizer and loader
    loop = {"step": 0, "total_training_time": 0.0, "smooth_loss": 0.0, "min_val_bpb": float("inf")}
    loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, split="train", data=sources,
                        rank=rank, world_size=world_size, device=device, data_seed=args.data_seed)
    if args.resume_from_step:
        step = resolve_step(checkpoint_root, args.resume_from_step)
        ckpt_dir = step_dir(checkpoint_root, step)
        meta = load_meta(ckpt_dir)
        saved_config = GPTConfig(**meta["model_config"]).to_dict()  # fields added since the save take their defaults
        if saved_config != config.to_dict():
            raise CheckpointError(f"{ckpt_dir} holds a model of config {saved_config}, this run builds "
                                  f"{config.to_dict()}: pass the same --depth/--max-seq-len/--aspect-ratio/--head-dim/"
                                  "--window-pattern/--norm-gains")
        load_model_weights(model, ckpt_dir)
        state = load_rank_state(ckpt_dir, rank, world_size)
        optimizer.load_state_dict(state["optimizer"])
        try:
            loader.load_state_dict(state["loader"])
        except ValueError as e:  # another --device-batch-size, --max-seq-len, --data or world size: say so, no traceback
            raise CheckpointError(f"cannot resume from {ckpt_dir}: {e}; rerun with the flags it was saved with "
                                  f"({os.path.join(run_dir, 'run.json')} lists them)") from None
        scaler.load_state_dict(state["scaler"])
        loop = meta["loop_state"]
        check_resumed_horizon(meta, hp, loop["step"], args, ckpt_dir)
        print0(f"resumed from {ckpt_dir} at step {loop['step']}")
        if loop["step"] == hp["num_iterations"]:
            print0(f"the run already finished at step {loop['step']} (min val bpb {format_bpb(loop['min_val_bpb'])}): "
                   f"nothing to train; evaluate it with: python -m scripts.base_eval --run-dir {run_dir}")
            if run_lock:
                run_lock.release()
            loader.close()
            cleanup_dist()
            return loop

    eval_tokens_per_step = args.device_batch_size * args.max_seq_len * world_size
    eval_steps = max(1, args.eval_tokens // eval_tokens_per_step)
    peak, peak_source = peak_flops(device)
    attn_backend, attn_reason = select_backend(device, COMPUTE_DTYPE)
    print0(f"compute dtype: {COMPUTE_DTYPE} ({COMPUTE_DTYPE_REASON}) | attention: {attn_reason}")
    window_notice = sdpa_window_notice(device, COMPUTE_DTYPE, config, hp["flops_per_token"])
    if window_notice:  # loud: this silently costs a GPU run time (and money) otherwise
        print0(f"WARNING: {window_notice}. Install FA3 (scripts/setup_venv.sh) or pass --window-pattern L.")
    print0(f"peak FLOP/s per device: {peak:.3e} ({peak_source})" if peak else f"peak FLOP/s unknown ({peak_source}): MFU not reported")
    print0(f"world size {world_size} | device {device}")
    print0("data: " + ", ".join(f"{s.name} ({s.location}, {share:.1%} of the tokens)"
                                for s, share in zip(sources, shares(sources))))
    print0("resolved hyperparameters:\n" + format_table(hp))
    if extrapolation_note(hp, args):
        print0(extrapolation_note(hp, args))

    run_info = {"args": vars(args), "hyperparameters": hp, "model_config": config.to_dict(),
                "data_signature": data_signature(args, tokenizer, sources, eval_steps * eval_tokens_per_step),
                "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "world_size": world_size, "peak_flops": peak, "attention": attn_backend}}
    log = RunLog(run_dir, name, run_info, use_wandb=bool(args.run),
                 resume_step=loop["step"] if args.resume_from_step else None, enabled=master)

    warm_up(compiled, model, optimizer, args, device, scaler)
    # MuonAdamW allocates its state up front, so this is the real size of a checkpoint (within headers)
    checkpoint_need_bytes = checkpoint_bytes(model, {"optimizer": optimizer.state_dict()})
    disk_warning = None

    def warn_if_disk_short():
        """Warns once per drop of the free space below one checkpoint: checked at start, after each save and
        every DISK_CHECK_EVERY steps, so there is time to act before the save that would fail."""
        nonlocal disk_warning
        warning = disk_space_warning(checkpoint_root, checkpoint_need_bytes) if master else None
        if warning and not disk_warning:
            print0(warning)
        disk_warning = warning

    warn_if_disk_short()
    token_bytes = tokenizer.token_bytes().to(device)
    num_iterations, grad_accum = hp["num_iterations"], hp["grad_accum_steps"]
    flops_per_token, total_batch = hp["flops_per_token"], hp["total_batch_tokens"]
    recent_mfu = []
    start_step = loop["step"]
    spikes = SpikeDetector()
    if args.resume_from_step and "spikes" in state:
        spikes.load_state_dict(state["spikes"])

    def due(every, step):
        """Periodic work at this step? Never at step 0, nor again at the step a resume starts from."""
        return every > 0 and step % every == 0 and step > start_step

    def save(step):
        """Collective checkpoint of everything a resume needs; a failed save ends the run with the resume command."""
        meta = {"model_config": config.to_dict(), "args": vars(args), "hyperparameters": hp, "loop_state": loop}
        rank_state = {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                      "scaler": scaler.state_dict(), "spikes": spikes.state_dict()}
        # a gradient can go non-finite while the loss is finite: never write such weights (agreed: saving is collective)
        bad = check_finite([*model.named_parameters(), *optimizer_tensors(rank_state["optimizer"])])
        if across_ranks(bad is not None, dist.ReduceOp.MAX):
            raise TrainingDiverged(diverged_message(step, f"{bad or 'a tensor on another rank'} holds a NaN/inf "
                                                    "(not saved)", checkpoint_root, run_dir, args))
        try:
            path = save_checkpoint(checkpoint_root, step, model, rank_state, meta, rank, world_size)
        except CheckpointError as e:
            steps = list_steps(checkpoint_root)
            raise CheckpointError(f"{e} — then resume with: {resume_command(run_dir, steps[-1])}" if steps else
                                  f"{e} — then start the run again") from None
        print0(f"saved checkpoint {path}")
        warn_if_disk_short()

    preemption = PreemptionHandler().install()
    stopping = False  # set on every rank at once, after a step, when any rank got SIGTERM/SIGINT
    while True:
        step = loop["step"]
        last = step == num_iterations
        if stopping and not last:  # preempted: save (even with --save-every 0) and stop; no eval, time is short
            save(step)
            print0(f"stopped at step {step} on {preemption.received or 'a signal to another rank'}; "
                   f"resume with: {resume_command(run_dir, step)}")
            break
        progress = {"step": step, "total_training_flops": flops_per_token * total_batch * step,
                    "total_training_time": loop["total_training_time"]}
        if last or due(args.eval_every, step) or (step == 0 and args.eval_every > 0):
            val = evaluate_val(compiled, model, tokenizer, sources, args, rank, world_size, device, eval_steps, token_bytes)
            val_bpb = val["val/bpb"]
            loop["min_val_bpb"] = min(loop["min_val_bpb"], val_bpb)
            per_source = "".join(f" | {k.removeprefix('val/bpb/')} {v:.4f}" for k, v in val.items() if k != "val/bpb")
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}{per_source}")
            log.log({**progress, **val})
        # save before CORE and sampling: whatever they do, the trained weights are already on disk
        if args.save_every != 0 and step > start_step and (last or due(args.save_every, step)):
            save(step)
        if core_bundle and (last or due(args.core_metric_every, step)):
            core = run_core(model, tokenizer, core_bundle, args, device, config)
            log.log({**progress, "core_metric": core["core_metric"], **{f"core/{k}": v for k, v in core["centered"].items()}})
        if args.sample_every != 0 and (last or due(args.sample_every, step)) and master:
            print_samples(model, tokenizer)
        if last:
            break

        # ---- one optimizer step -------------------------------------------------
        lrm = scaling.lr_multiplier(step, num_iterations, hp["warmup_steps"], args.warmdown_frac, args.final_lr_frac)
        optimizer.update_hparams(lr_multiplier=lrm, weight_decay_multiplier=scaling.weight_decay_multiplier(step, num_iterations),
                                 muon_momentum=scaling.muon_momentum(step, num_iterations, args.warmdown_frac,
                                                                      ramp_first=bool(args.momentum_ramp_first)))
        synchronize(device)
        t0 = time.perf_counter()
        try:
            train_loss, data_wait_s, optim_s, found_inf, crop = train_step(model, compiled, optimizer, scaler, loader, grad_accum)
        except TrainingDiverged as e:  # every rank, same step: the weights are still those of the last step
            raise TrainingDiverged(diverged_message(step + 1, f"the training loss is {e}; stopped before the optimizer "
                                                    "step", checkpoint_root, run_dir, args)) from None
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
        # the step time so far predicts the rest; before step 2 there is none (step 1 carries the one-off costs)
        eta = format_duration((num_iterations - step) * loop["total_training_time"] / (step - 1)) if step > 1 else "?"
        mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
        spike = spikes.update(train_loss)  # this rank's loss (rank 0's is the one printed and logged)
        print0(f"step {step:05d}/{num_iterations:05d} ({done_frac:.1%}) | loss {smooth:.4f} | lrm {lrm:.2f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {tok_per_s:,.0f} | mfu {mfu_text} | eta {eta}"
               + (" | inf: step skipped" if found_inf else ""))
        if spike:
            print0(f"WARNING: loss spike at step {step}: {train_loss:.4f} against a median of {spike[0]:.4f} over the last "
                   f"{SpikeDetector.WINDOW} steps (threshold {spike[1]:.4f}); if they repeat, lower the LRs")
        log.log({"step": step, "train/loss": train_loss, "train/loss_smooth": smooth, "train/lrm": lrm, "train/dt": dt,
                 "train/dt_data": data_wait_s, "train/dt_optim": optim_s, "train/tok_per_sec": tok_per_s,
                 "train/mfu": mfu, "train/crop_fraction": crop, "train/skipped": found_inf,
                 "train/spike": spike is not None,
                 "total_training_flops": flops_per_token * total_batch * step,
                 "total_training_time": loop["total_training_time"]})
        recent_mfu.append((mfu, data_wait_s / dt, optim_s / dt))
        if device.type == "cuda" and step % 100 == 0 and mfu is not None:
            window = recent_mfu[-50:]
            mean = [sum(v[i] for v in window) / len(window) for i in range(3)]
            diagnosis = diagnose_low_mfu(*mean, args.device_batch_size * args.max_seq_len)
            if diagnosis:
                print0(f"WARNING: {diagnosis}")
        if step % DISK_CHECK_EVERY == 0:
            warn_if_disk_short()
        stopping = preemption.stop_requested()  # collective: every rank stops after this same step

    preemption.uninstall()
    print0(f"done: {loop['step']} steps, min val bpb {format_bpb(loop['min_val_bpb'])}, training time "
           f"{format_duration(loop['total_training_time'])} (steps after the first), wall {format_duration(time.time() - run_start)}")
    if device.type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    log.finish()
    loader.close()
    if run_lock:
        run_lock.release()
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
    """Greedy continuations of the prompts, one batch through the KV-cache engine on the eager model."""
    from nanochat.engine import complete
    with disable_fp8(model):
        for prompt, text in zip(prompts, complete(model, tokenizer, prompts, 16)):
            print0(f"sample: {prompt!r} -> {text!r}")


if __name__ == "__main__":
    run_main(main, "base_train", BAD_INPUT_ERRORS)
