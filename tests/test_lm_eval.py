"""lm-evaluation-harness on the export, item by item against core_eval (dev/lm_eval's tasks: the mini bundle's
multiple-choice and schema items with core_eval's few-shot contexts).

The README's command runs offline on an exported 3-layer model whose every parameter is moved off its init:
the d2 model trained 4 steps (test_export_hf) still barely reads its context (its logits with and without
BOS agree to ~1e-4), so it could not tell a harness that drops BOS or context from one that keeps them.
Then, per item and candidate:
- lm-eval scored the same (context, continuation) strings core_eval renders;
- its log-likelihood equals minus core_eval's summed answer loss (mean_loss x answer_tokens);
- its `acc` pick (argmax of summed log-likelihood) equals core_eval's argmin of summed loss, and the pick of
  CORE's own rule (lowest mean loss per answer token) computed from lm-eval's numbers equals core_eval's.
The two rules differ on multiple-choice items whose choices have different token counts; the test
prints how often, per task (the LOG's table).
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval", reason="pip install -e '.[hf]'")

from nanochat import core_eval  # noqa: E402
from test_export_hf import REPO, hf_env, load_ours, perturbed_checkpoint  # noqa: E402

TASKS = {"core_mini_science_qa": "mini_science_qa", "core_mini_cause_effect": "mini_cause_effect",
         "core_mini_winograd": "mini_winograd"}
TIE_NATS = 1e-4  # picks closer than this in summed log-likelihood count as either (fp32 sums over ~10 tokens)


def run_lm_eval(folder, out_dir):
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", ",".join(TASKS),
               "--include_path", os.path.join(REPO, "dev", "lm_eval"), "--device", "cpu", "--batch_size", "16",
               "--output_path", str(out_dir), "--log_samples"]
    result = subprocess.run(command, cwd=REPO, env=hf_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(os.path.join(out_dir, "*", f"samples_{task}_*.jsonl"))
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    return samples


def picks(scores, best):
    """Indices whose score is within TIE_NATS of the best (max) one."""
    return {i for i, s in enumerate(scores) if s >= best - TIE_NATS}


def test_lm_eval_picks_what_core_eval_picks(tokenizer, tmp_path):
    from scripts.export_hf import export
    checkpoint = perturbed_checkpoint(tmp_path / "run", sequence_len=512)
    folder = export(checkpoint, tokenizer, str(tmp_path / "hf"))
    samples = run_lm_eval(folder, tmp_path / "lm_eval")
    model = load_ours(checkpoint)
    tasks = {t["label"]: t for t in core_eval.load_tasks(core_eval.MINI_BUNDLE_DIR)}
    table = []
    for name, label in TASKS.items():
        task = tasks[label]
        ours = core_eval.item_predictions(model, tokenizer, task, core_eval.shuffled_items(task), torch.device("cpu"),
                                          model.config.sequence_len)
        assert len(samples[name]) == len(ours) == 12
        rules_differ = 0
        for sample, item in zip(samples[name], ours):
            args = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
            assert args == [tuple(pair) for pair in item["candidates"]]  # the same strings, in the same order
            # no prompt is cut to the context length: core_eval and lm-eval cut differently (see the LOG)
            assert max(len(tokenizer.encode(c + a)) for c, a in args) < model.config.sequence_len
            lm_ll = [float(ll) for ll, _ in sample["filtered_resps"]]
            our_ll = [-m * n for m, n in zip(item["mean_loss"], item["answer_tokens"])]
            assert lm_ll == pytest.approx(our_ll, rel=1e-5, abs=1e-4)
            # lm-eval `acc`: argmax of summed log-likelihood
            assert max(range(len(lm_ll)), key=lm_ll.__getitem__) in picks(our_ll, max(our_ll))
            assert sample["acc"] == float(max(range(len(lm_ll)), key=lm_ll.__getitem__) == item["gold"])
            # CORE's rule: lowest mean loss per answer token; lm-eval's continuation tokens are counted its way
            # (encode context + continuation, drop the context's tokens)
            counts = [len(tokenizer.encode(c + a)) - len(tokenizer.encode(c)) for c, a in item["candidates"]]
            assert counts == item["answer_tokens"]
            lm_mean = [ll / n for ll, n in zip(lm_ll, counts)]
            our_mean = [-m for m in item["mean_loss"]]
            assert max(range(len(lm_mean)), key=lm_mean.__getitem__) in picks(our_mean, max(our_mean))
            rules_differ += max(range(len(our_ll)), key=our_ll.__getitem__) != max(range(len(our_mean)), key=our_mean.__getitem__)
        table.append(f"{label}: {len(ours)} items, lm-eval acc {sum(s['acc'] for s in samples[name]) / len(ours):.3f}, "
                     f"core_eval {sum(i['credit'] for i in ours) / len(ours):.3f}, summed vs mean rule differ on {rules_differ}")
    print("\n".join(table))
