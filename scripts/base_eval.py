"""Evaluate a base-model checkpoint: CORE, bits per byte on train and val, and a few greedy samples.

python -m scripts.base_eval                       # the latest run under <base>/runs, its latest checkpoint
python -m scripts.base_eval --run my-run          # a run by name (base_train's --run), or --run-dir PATH
torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --run my-run --step 5000

Results go to stdout, to `<run-dir>/base_eval_step<step>.csv`, and to wandb (as `<run name>-eval`) with --wandb.
"""

import csv
import os
import time

import torch

from nanochat.checkpoint import CheckpointError, load_meta, load_model_weights, resolve_step, step_dir
from nanochat.cli import ArgumentParser, number, run_main
from nanochat.common import cleanup_dist, get_base_dir, init_dist, print0
from nanochat.core_eval import BundleError, evaluate_core, get_eval_bundle
from nanochat.dataloader import DataLoader
from nanochat.dataset import DataError
from nanochat.engine import complete
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.mixture import SPEC_HELP, check_sources, resolve_sources, shares
from nanochat.report import start_wandb
from nanochat.runs import RunDirError, latest_run_dir, resolve_run_dir
from nanochat.tokenizer import TokenizerError, get_tokenizer
from scripts import base_train

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "In the beginning",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]


def parse_args(argv=None):
    """The flags, each range-checked while parsing: a bad value is one line on stderr before anything is loaded."""
    p = ArgumentParser(description="Evaluate a nanochat base checkpoint: without --run or --run-dir, the latest run's.")
    add_checkpoint_flags(p)
    p.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--max-per-task", type=number(int, low=1, also=(-1,)), default=-1, help="CORE items per task (-1: all)")
    p.add_argument("--eval-bundle", default="", help="CORE bundle: local dir or zip (default: download once to the cache)")
    p.add_argument("--skip-core", action="store_true", help="only bits per byte and samples")
    p.add_argument("--bpb-tokens", type=number(int, low=1), default=10 * 2**19, help="tokens per split for bits per byte (at most one pass over the split)")
    p.add_argument("--device-batch-size", type=number(int, low=1), default=32, help="sequences per device for bits per byte")
    p.add_argument("--data-dir", default="", help="parquet shards (default: the run's own --data or "
                   "--data-dir, else $NANOCHAT_DATA_DIR or <base>/base_data)")
    p.add_argument("--data", default="", help=SPEC_HELP.split(" (default:")[0] + " (default: the run's own --data, "
                   "else --data-dir)")
    p.add_argument("--text-column", default="", help="text column of sources that name none (default: the run's, else 'text')")
    p.add_argument("--num-sample-tokens", type=number(int, low=0), default=24, help="greedy tokens per sample prompt (0: no samples)")
    p.add_argument("--wandb", action="store_true", help="also log the results to wandb as '<run name>-eval' (offline "
                   "without a login)")
    args = p.parse_args(argv)
    check_checkpoint_flags(p, args)
    for flag in ("run_dir", "data_dir", "tokenizer_dir"):
        path = getattr(args, flag)
        if path and os.path.exists(path) and not os.path.isdir(path):
            p.error(f"--{flag.replace('_', '-')} {path} is a file, not a directory")
    base_train.check_device_type(p, args.device_type)
    return args


def add_checkpoint_flags(p):
    """--run / --run-dir / --depth / --step / --tokenizer-dir: which checkpoint a tool reads, found as find_run_dir does
    (base_eval, scripts.sample, scripts.export_hf); check_checkpoint_flags checks them after parsing."""
    p.add_argument("--run", default="", help="the run, by name (base_train's --run, or the d<depth>-<time> name it "
                   "printed) under <base>/runs (default: the latest run)")
    p.add_argument("--run-dir", default="", help="the run, by directory (default: see --run)")
    p.add_argument("--depth", type=number(int, low=1), default=None,
                   help="without --run/--run-dir: the latest run of this depth (default: any depth)")
    p.add_argument("--step", default="latest", help="checkpoint step, or 'latest'")
    p.add_argument("--tokenizer-dir", default="", help="tokenizer (default: the run's own, else <base>/tokenizer)")


def check_checkpoint_flags(p, args):
    """A contradictory or malformed choice of checkpoint is one line (p.error) before anything is loaded."""
    if args.run and args.run_dir:
        p.error("pass --run NAME or --run-dir PATH, not both")
    if args.depth is not None and (args.run or args.run_dir):
        p.error("--depth only picks the latest run of that depth; with --run/--run-dir it would be ignored")
    if args.step != "latest" and not args.step.isdigit():
        p.error(f"--step takes a checkpoint step number or 'latest', got {args.step!r}")


def find_run_dir(args):
    """--run-dir, else --run by name (or path), else the latest run (of --depth): a RunDirError names what exists."""
    if args.run_dir:
        return resolve_run_dir(args.run_dir, get_base_dir())
    if args.run:
        return resolve_run_dir(args.run, get_base_dir())
    return latest_run_dir(get_base_dir(), args.depth)


def load_model(checkpoint_dir, device):
    meta = load_meta(checkpoint_dir)
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint_dir}/meta.json holds no valid model_config ({e}): evaluate another step") from None
    model = GPT.build(config, device)  # init for the buffers; weights loaded next
    load_model_weights(model, checkpoint_dir)
    model.eval()
    return model, meta


def run_tokenizer(args, meta):
    """--tokenizer-dir if given, else the one the run was trained with (its --tokenizer-dir), else <base>/tokenizer."""
    return get_tokenizer(args.tokenizer_dir or meta.get("args", {}).get("tokenizer_dir") or None)


def run_sources(args, meta):
    """The sources to measure bpb on: --data / --data-dir if given, else the run's own --data mixture or --data-dir,
    else the default dir (a run trained on its own data is evaluated on that data's val split without repeating it)."""
    run_args = meta.get("args", {})
    column = args.text_column or run_args.get("text_column") or "text"
    if args.data or args.data_dir:
        sources = resolve_sources(args.data, args.data_dir or None, column)
    else:
        sources = resolve_sources(run_args.get("data", ""), run_args.get("data_dir") or None, column)
    check_sources(sources)
    return sources


def main(argv=None):
    args = parse_args(argv)
    dist_info = init_dist(args.device_type or None)
    device, rank, world_size = dist_info.device, dist_info.rank, dist_info.world_size
    run_dir = find_run_dir(args)
    checkpoint_root = os.path.join(run_dir, "checkpoints")
    step = resolve_step(checkpoint_root, args.step)
    # every input is checked before the slow work: the tokenizer, the data, the CORE bundle, the weights
    meta = load_meta(step_dir(checkpoint_root, step))
    tokenizer = run_tokenizer(args, meta)
    sources = run_sources(args, meta)
    bundle = None if args.skip_core else get_eval_bundle(args.eval_bundle or None)
    model, meta = load_model(step_dir(checkpoint_root, step), device)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise SystemExit(f"base_eval: the tokenizer has {tokenizer.vocab_size} tokens, the checkpoint's model {model.config.vocab_size}: "
                         "pass the --tokenizer-dir the run was trained with")
    T = model.config.sequence_len
    print0(f"evaluating {run_dir} step {step} (depth {model.config.n_layer}, T {T}) on {world_size} x {device}")
    rows = []  # (metric, value, centered)

    # bits per byte on both splits, per source of a mixture, and the mixture (per-source bpb weighted by its shares)
    steps = max(1, args.bpb_tokens // (args.device_batch_size * T * world_size))
    token_bytes = tokenizer.token_bytes().to(device)
    with torch.no_grad():
        for split in ("train", "val"):
            per_source = []
            for source in sources:
                t0 = time.time()
                with DataLoader(tokenizer, args.device_batch_size, T, split=split, data=[source], rank=rank,
                                world_size=world_size, device=device, packer=base_train.VAL_PACKER) as batches:
                    bpb = evaluate_bpb(model, batches.one_pass(), steps, token_bytes)
                tokens = batches.one_pass_batches * args.device_batch_size * T
                name = f"{split}_bpb" if len(sources) == 1 else f"{split}_bpb/{source.name}"
                print0(f"{name}: {bpb:.4f} ({tokens:,} tokens per rank, {time.time() - t0:.1f}s)")
                per_source.append(bpb)
                rows.append((name, bpb, ""))
            if len(sources) > 1:
                mixture = sum(share * bpb for share, bpb in zip(shares(sources), per_source))
                print0(f"{split}_bpb (mixture): {mixture:.4f}")
                rows.append((f"{split}_bpb", mixture, ""))

    # CORE
    if not args.skip_core:
        with torch.no_grad():
            core = evaluate_core(model, tokenizer, bundle, device, T, max_per_task=args.max_per_task, print_fn=print0)
        rows += [(label, acc, core["centered"][label]) for label, acc in core["results"].items()]
        rows.append(("core_metric", core["core_metric"], ""))

    # samples
    if args.num_sample_tokens > 0 and dist_info.is_master:
        for prompt, text in zip(SAMPLE_PROMPTS, complete(model, tokenizer, SAMPLE_PROMPTS, args.num_sample_tokens)):
            print0(f"sample: {prompt!r} -> {text!r}")  # one batch through the KV-cache engine, each row stops at BOS

    if dist_info.is_master:
        csv_path = os.path.join(run_dir, f"base_eval_step{step:06d}.csv")
        with open(csv_path + ".tmp", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["metric", "value", "centered"])
            writer.writerows(rows)
        os.replace(csv_path + ".tmp", csv_path)
        print0(f"wrote {csv_path}")
        if args.wandb:
            wb = start_wandb(f"{os.path.basename(os.path.normpath(run_dir))}-eval", {"step": step, **meta["args"]}, run_dir)
            wb.log({f"eval/{metric}": value for metric, value, _ in rows} | {"step": step})
            wb.finish()
    cleanup_dist()
    return dict((metric, value) for metric, value, _ in rows)


if __name__ == "__main__":
    run_main(main, "base_eval", (BundleError, CheckpointError, DataError, RunDirError, TokenizerError))
