"""Sample from a checkpoint with your own prompts, through the KV-cache engine (nanochat/engine.py).

python -m scripts.sample --prompt "The capital of France is"                   # the latest run, greedy
python -m scripts.sample --run my-run --step 5000 --prompt "Once upon a time" --prompt "In 1905," \\
    --max-new-tokens 128 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1

Each --prompt is one row of a batch, read as BOS + prompt; a row stops when the model samples BOS
(it starts a new document) or after --max-new-tokens. The run and step are found as base_eval finds them.
"""

import torch

from nanochat.checkpoint import CheckpointError, load_meta, resolve_step, step_dir
from nanochat.cli import ArgumentParser, number, run_main
from nanochat.common import autodetect_device_type
from nanochat.engine import generate
from nanochat.runs import RunDirError
from nanochat.tokenizer import TokenizerError
from scripts import base_eval, base_train


def parse_args(argv=None):
    p = ArgumentParser(description="Continue your prompts with a nanochat base checkpoint (KV-cache sampling).")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt; repeat for a batch (default: base_eval's sample prompts)")
    p.add_argument("--max-new-tokens", type=number(int, low=1), default=64,
                   help="new tokens per prompt at most (prompt + new tokens - 1 must fit the model's sequence_len)")
    p.add_argument("--temperature", type=number(float, low=0), default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=number(int, low=1), default=None, help="draw among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=number(float, low=0, high=1), default=None,
                   help="draw among the fewest most likely tokens whose probability reaches p (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (a torch.Generator)")
    base_eval.add_checkpoint_flags(p)
    p.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="cuda | cpu | mps (default: autodetect)")
    args = p.parse_args(argv)
    base_eval.check_checkpoint_flags(p, args)
    if args.top_p == 0:
        p.error("--top-p must be > 0 (1 keeps every token)")
    base_train.check_device_type(p, args.device_type)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device_type or autodetect_device_type())
    checkpoint_root = f"{base_eval.find_run_dir(args)}/checkpoints"
    step = resolve_step(checkpoint_root, args.step)
    tokenizer = base_eval.run_tokenizer(args, load_meta(step_dir(checkpoint_root, step)))
    model, _ = base_eval.load_model(step_dir(checkpoint_root, step), device)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise SystemExit(f"sample: the tokenizer has {tokenizer.vocab_size} tokens, the checkpoint's model "
                         f"{model.config.vocab_size}: pass the --tokenizer-dir the run was trained with")
    texts = args.prompt or base_eval.SAMPLE_PROMPTS
    prompts = tokenizer.encode(texts, prepend_bos=True)
    try:
        rows = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        args.seed, stop_token=tokenizer.bos_token_id)
    except ValueError as e:  # a prompt too long for the context: say so on one line
        raise SystemExit(f"sample: {e}") from None
    for i, (text, row) in enumerate(zip(texts, rows)):
        stopped = "stopped at BOS" if len(row) < args.max_new_tokens else "max new tokens"
        print(f"--- prompt {i + 1} of {len(texts)}, {len(row)} new tokens ({stopped})")
        print(text + tokenizer.decode(row))
    return rows


if __name__ == "__main__":
    run_main(main, "sample", (CheckpointError, RunDirError, TokenizerError))
