"""Shared by the evaluation tests and their torchrun worker: a byte tokenizer, a small bundle in the
real layout, reference models (oracle, uniform) and a tiny GPT."""

import json
import os

import torch
import torch.nn as nn

from nanochat.core_eval import render_item, tokenize_pairs
from nanochat.gpt import GPT, GPTConfig


class ByteTokenizer:
    """The tokenizer interface of nanochat.tokenizer at its simplest: ids 0-255 are bytes, 256 is BOS."""

    bos_token_id = 256
    vocab_size = 257

    def encode(self, text, prepend_bos=False):
        if isinstance(text, list):
            return [self.encode(t, prepend_bos) for t in text]
        return [self.bos_token_id] * prepend_bos + list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self):
        return torch.tensor([1] * 256 + [0], dtype=torch.int32)


# -----------------------------------------------------------------------------
# a bundle in the layout of eval_bundle.zip: every task type, few-shot > 0

def _sum_item(a, b, rotation):
    choices = [str(a + b + d) for d in (0, 3, 5, 7)]  # no choice is a prefix of another
    choices = choices[rotation:] + choices[:rotation]
    return {"query": f"Question: what is {a} plus {b}?\nAnswer:", "choices": choices, "gold": choices.index(str(a + b))}


MC_ITEMS = [_sum_item(a, b, r) for a, b, r in [(1, 2, 0), (3, 4, 1), (2, 5, 2), (6, 1, 3), (4, 4, 1),
                                               (7, 2, 2), (5, 3, 0), (8, 1, 3), (3, 3, 2), (2, 2, 1)]]
SCHEMA_ITEMS = [{"context_options": [f"{p} gave {q} a {thing} because {p}", f"{p} gave {q} a {thing} because {q}"],
                 "continuation": continuation, "gold": gold}
                for p, q, thing, continuation, gold in [
                    ("Ann", "Bob", "coat", "was cold.", 1), ("Cy", "Di", "cake", "had baked too many.", 0),
                    ("Ed", "Flo", "map", "was lost.", 1), ("Gus", "Hal", "book", "had finished it.", 0),
                    ("Ida", "Jo", "lamp", "sat in the dark.", 1), ("Kim", "Lu", "pen", "had two of them.", 0),
                    ("Max", "Ned", "hat", "was bald and sunburnt.", 1), ("Oz", "Pia", "coin", "was generous.", 0)]]
LM_ITEMS = [{"context": context, "continuation": continuation} for context, continuation in [
    ("The capital of France is ", "Paris"), ("Two plus two makes", "four"), ("The sky on a clear day is", "blue"),
    ("Snow is cold and white; fire is hot and", "bright"), ("Monday comes before", "Tuesday"),
    ("A b c d", "e f g"), ("Ice melts into", "water"), ("Spiders have eight", "legs")]]

TEST_TASKS = [
    # label, type, uri, shots, delimiter, random baseline %, items
    ("arith_mc", "multiple_choice", "symbolic/arith_mc.jsonl", 3, " ", 25, MC_ITEMS),
    ("who_schema", "schema", "language/who_schema.jsonl", 2, " ", 50, SCHEMA_ITEMS),
    ("facts_lm", "language_modeling", "world/facts_lm.jsonl", 2, "\nAnswer: ", 0, LM_ITEMS),
]


def write_test_bundle(root):
    """Writes core.yaml, eval_meta_data.csv and eval_data/**.jsonl under root; returns root."""
    core = ["icl_tasks:"]
    meta = ["Eval Task,Task Category,Task Type,#shots,Random baseline,Centered Metric?,Description"]
    for label, kind, uri, shots, delim, baseline, items in TEST_TASKS:
        core += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                 f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
        meta.append(f"{label},test,{kind},{shots},{baseline},,a test task")
        path = os.path.join(root, "eval_data", uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write("\n".join(core) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("\n".join(meta) + "\n")
    return str(root)


# -----------------------------------------------------------------------------
# reference models: model(idx) -> logits (B, T, V)

class UniformModel(nn.Module):
    """No preference at all: every logit 0."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size)


class OracleModel(nn.Module):
    """Knows every gold sequence: after a prefix of one, all mass on its next gold token; uniform elsewhere."""

    def __init__(self, vocab_size, gold_sequences):
        super().__init__()
        self.vocab_size = vocab_size
        self.next_gold = {}
        for ids, answer_start in gold_sequences:
            for t in range(answer_start, len(ids)):
                self.next_gold[tuple(ids[:t])] = ids[t]

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next_gold.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 100.0
        return logits


def gold_sequences(tokenizer, task, items, max_seq_len):
    """The token sequence of every item's gold candidate, exactly as evaluate_task builds it."""
    seqs = []
    for idx in range(len(items)):
        pairs, gold = render_item(task, items, idx)
        seqs.append(tokenize_pairs(tokenizer, [pairs[gold]], max_seq_len)[0])
    return seqs


def tiny_gpt(vocab_size=257, sequence_len=64, seed=0, noise=0.0):
    """A 2-layer GPT; noise > 0 adds Gaussian noise to every weight so its predictions are far from uniform."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64, window_pattern="L")
    model = GPT(config, compute_dtype=torch.float32)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()
