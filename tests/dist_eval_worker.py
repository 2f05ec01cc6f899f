"""CORE and bits per byte at any world size: evaluate_all() in-process is world size 1; under
torchrun --nproc_per_node=2 (gloo) rank 0 writes the world-size-2 results as JSON to argv[2].

usage: torchrun --standalone --nproc_per_node=2 tests/dist_eval_worker.py BUNDLE OUT_JSON  (repo root on PYTHONPATH)
BUNDLE is anything get_eval_bundle takes: a directory or a zip (extracted once per node under a barrier).
"""

import json
import sys

import torch

from eval_helpers import ByteTokenizer, OracleModel, gold_sequences, tiny_gpt
from nanochat.common import cleanup_dist, init_dist
from nanochat.core_eval import evaluate_core, evaluate_task, get_eval_bundle, load_items, load_tasks
from nanochat.loss_eval import evaluate_bpb

MAX_SEQ_LEN = 48  # short enough that the few-shot prompts get truncated


def bpb_batches(tokenizer, num_batches=6, B=2, T=32):
    """Fixed batches of random bytes with some BOS inputs/targets and some ignored (-1) targets."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_batches):
        row = torch.randint(0, tokenizer.vocab_size, (B, T + 1), generator=g)
        targets = row[:, 1:].clone()
        targets[:, :3] = -1
        batches.append((row[:, :-1], targets))
    return batches


def evaluate_all(bundle, info):
    """CORE of a tiny GPT (all items, and 7 per task), oracle accuracies and bpb, as a JSON-able dict."""
    bundle_dir = get_eval_bundle(bundle)
    tokenizer = ByteTokenizer()
    model = tiny_gpt(sequence_len=MAX_SEQ_LEN, noise=0.1)
    quiet = lambda *args: None  # noqa: E731
    results = {
        "gpt": evaluate_core(model, tokenizer, bundle_dir, info.device, MAX_SEQ_LEN, print_fn=quiet),
        "gpt_max7": evaluate_core(model, tokenizer, bundle_dir, info.device, MAX_SEQ_LEN, max_per_task=7,
                                  print_fn=quiet),
    }
    oracle_accs = {}
    for task in load_tasks(bundle_dir):
        items = load_items(task)
        oracle = OracleModel(tokenizer.vocab_size, gold_sequences(tokenizer, task, items, MAX_SEQ_LEN))
        oracle_accs[task["label"]] = evaluate_task(oracle, tokenizer, task, items, info.device, MAX_SEQ_LEN)
    results["oracle"] = oracle_accs
    batches = bpb_batches(tokenizer)
    mine = batches[info.rank::info.world_size]
    results["bpb"] = evaluate_bpb(model, iter(mine), len(mine), tokenizer.token_bytes())
    # a rank whose stream is empty from the start (a tiny val share) must still meet the all-reduce
    only_rank0 = batches[0::2] if info.rank == 0 else []
    results["bpb_rank0_batches"] = evaluate_bpb(model, iter(only_rank0), len(batches), tokenizer.token_bytes())
    results["world_size"] = info.world_size
    return results


def main(bundle, out_path):
    info = init_dist("cpu")
    results = evaluate_all(bundle, info)
    if info.is_master:
        with open(out_path, "w") as f:
            json.dump(results, f)
    cleanup_dist()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
