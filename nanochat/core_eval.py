"""The DCLM CORE metric: the eval bundle, few-shot prompts, batched scoring, centered accuracy.

The bundle (the public eval_bundle.zip, or data/eval_bundle_mini offline) holds
    core.yaml              icl_tasks: label, icl_task_type, dataset_uri, num_fewshot, continuation_delimiter
    eval_meta_data.csv     "Eval Task" -> "Random baseline" in percent
    eval_data/<uri>.jsonl  one item per line:
        multiple_choice    query, choices, gold       the choice with the lowest mean loss must be gold
        schema             context_options, continuation, gold
                                                      the context under which the shared continuation
                                                      has the lowest mean loss must be gold
        language_modeling  context, continuation      greedy decoding must reproduce the continuation

Every prompt is BOS + few-shot examples ("context{delim}answer", each followed by a blank line)
+ the item's context, then the answer. Context and answer are tokenized separately, with the
context's trailing spaces moved into the answer (" Paris", not " " + "Paris"), so the answer
tokens are exactly known and identical across an item's candidates. Too-long prompts lose
tokens from the left, right after BOS, keeping the answer.

Ties are broken uniformly at random and scored by their exact expectation: an item where k
candidates tie for the lowest loss earns 1/k if gold is among them, and a language-modelling
position where k tokens share the top logit passes with probability 1/k. So a model with no
preference scores chance accuracy (the random baseline) exactly, whatever the order of the choices.

Accuracy per task, centered accuracy (acc - b) / (1 - b) with b the random baseline, and CORE
= mean centered accuracy. Items are strided across ranks (rank r scores items r, r + W, ...)
and the credit sums all-reduced, so the result does not depend on the world size.
"""

import csv
import functools
import hashlib
import json
import os
import random
import re
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import torch
import torch.distributed as dist
import yaml

from nanochat.cli import one_line
from nanochat.common import across_ranks, get_base_dir

# the bundle nanochat and the speedrun publish (DCLM's CORE tasks, ~22 tasks)
DEFAULT_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
MINI_BUNDLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "eval_bundle_mini")

FEWSHOT_SEED = 1234          # item idx draws its examples with Random(FEWSHOT_SEED + idx)
SHUFFLE_SEED = 1337          # evaluate_core shuffles each task once so max_per_task takes a fair sample
EVAL_BATCH_TOKENS = 2**14    # padded tokens per forward: full logits are 2 GiB of fp32 at vocab 32768
TIE_TOLERANCE_NATS = 1e-6    # mean losses closer than this are a tie (fp32 noise is ~1e-7 nats)
FRESH_BUNDLE = "the bundle is damaged: get a fresh copy (delete the extracted one) or pass another --eval-bundle"

ITEM_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}

# -----------------------------------------------------------------------------
# the bundle: download once, extract safely, parse


class BundleError(RuntimeError):
    """The eval bundle cannot be had or read (download failed, not a zip, unsafe or malformed content):
    the message names the file and says what to do."""


def get_eval_bundle(path_or_url=None):
    """The bundle directory (the one holding core.yaml) for a local dir, a local zip, an http(s) URL,
    or None for DEFAULT_BUNDLE_URL. Zips are extracted once into get_base_dir() and reused.

    Under torch.distributed call it on every rank: local rank 0 of each node fetches and extracts,
    the other ranks wait at a barrier and then read its copy (not 8 downloads per node).
    Every task and item is parsed here (`check_bundle`), so a malformed bundle fails at startup,
    not after training.
    """
    return check_bundle(_locate_bundle(path_or_url or DEFAULT_BUNDLE_URL))


def check_bundle(bundle_dir):
    """bundle_dir, after parsing every task and item of it (BundleError on the first defect)."""
    for task in load_tasks(bundle_dir):
        load_items(task)
    return bundle_dir


def _locate_bundle(source):
    if os.path.isdir(source):
        return find_bundle_root(source)
    if source.startswith(("http://", "https://")):
        name = "eval_bundle" if source == DEFAULT_BUNDLE_URL else f"eval_bundle-{_digest(source.encode())}"
        return _install_once(os.path.join(get_base_dir(), name), functools.partial(_download_and_install, source))
    if os.path.isfile(source):
        if not zipfile.is_zipfile(source):
            raise BundleError(f"eval bundle {source!r} is a file but not a zip archive: pass the eval_bundle.zip "
                             "or the directory holding core.yaml")
        with open(source, "rb") as f:
            target = os.path.join(get_base_dir(), f"eval_bundle-{_digest(f.read())}")
        return _install_once(target, functools.partial(_install_zip, source))
    raise BundleError(f"eval bundle {source!r} is neither a directory, a zip file nor an http(s) URL; "
                            f"for a small offline bundle pass {MINI_BUNDLE_DIR}")


def _install_once(target, install):
    error = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not os.path.isdir(target):
        try:
            install(target)
        except Exception as e:  # held until every rank knows: a rank left waiting alone would hang the job
            error = e
    # an all-reduce instead of a barrier: it also tells the waiting ranks whether the install worked
    if across_ranks(error is not None, dist.ReduceOp.MAX) and error is None:
        raise BundleError("the eval bundle could not be installed on another rank (its message says why)")
    if error is not None:
        raise error
    return find_bundle_root(target)


def find_bundle_root(directory):
    """The directory itself if it holds core.yaml, else its only subdirectory that does (zips wrap one)."""
    if os.path.isfile(os.path.join(directory, "core.yaml")):
        return directory
    inner = [os.path.join(directory, d) for d in sorted(os.listdir(directory))
             if os.path.isfile(os.path.join(directory, d, "core.yaml"))]
    if len(inner) != 1:
        raise BundleError(f"{directory} is not a CORE eval bundle: no core.yaml in it or in exactly one "
                                "folder below it")
    return inner[0]


def _digest(data):
    return hashlib.sha256(data).hexdigest()[:16]


def _download(url, path):
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError) as e:  # offline, DNS, refused, timeout, HTTP errors
        raise BundleError(f"could not download the CORE eval bundle from {url} ({e}). Offline? Pass "
                           f"--eval-bundle {MINI_BUNDLE_DIR} (a small sample bundle shipped with nanochat) or "
                           "--eval-bundle PATH to a local eval_bundle.zip or its unpacked directory") from None


def _download_and_install(url, target):
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target), prefix=".download-") as tmp:
        zip_path = os.path.join(tmp, "eval_bundle.zip")
        _download(url, zip_path)
        if not zipfile.is_zipfile(zip_path):
            raise BundleError(f"{url} did not return a zip archive: check the URL, or pass --eval-bundle PATH")
        _install_zip(zip_path, target)


def _install_zip(zip_path, target):
    """Extract into a temporary sibling of target, check it is a bundle, then rename it into place."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".extract-")
    try:
        safe_extract(zip_path, tmp)
        find_bundle_root(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # not the benign race of another rank installing it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def safe_extract(zip_path, dest):
    """Extract zip_path into dest, refusing the whole archive if any member could land outside dest."""
    dest = os.path.realpath(dest)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                name = info.filename
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise BundleError(f"refusing to extract {zip_path}: member {name!r} is a symbolic link "
                                      "(it could point outside the target directory)")
                parts = re.split(r"[\\/]", name)
                path = os.path.realpath(os.path.join(dest, name))
                if (name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts
                        or os.path.commonpath([dest, path]) != dest):
                    raise BundleError(f"refusing to extract {zip_path}: member {name!r} would land outside {dest}; "
                                      "the archive is corrupt or malicious, get a fresh copy of the bundle")
            zf.extractall(dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:  # a truncated or damaged archive
        raise BundleError(f"{zip_path} is a damaged zip archive ({e}): get a fresh copy of the bundle") from None


def _read_baselines(csv_path):
    """{task label: random-guess accuracy in percent} from eval_meta_data.csv."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
            raise ValueError("it needs the columns 'Eval Task' and 'Random baseline'")
        return {row["Eval Task"].strip(): float(row["Random baseline"]) for row in rows}
    except (OSError, ValueError, csv.Error) as e:
        raise BundleError(f"{csv_path} cannot be read ({e}): {FRESH_BUNDLE}") from None


def load_tasks(bundle_dir):
    """The tasks of core.yaml, each a dict: label, icl_task_type, dataset_uri, data_path, num_fewshot (int),
    continuation_delimiter, baseline_acc (random-guess accuracy as a fraction, from eval_meta_data.csv)."""
    try:
        with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise BundleError(f"{bundle_dir}/core.yaml cannot be read ({one_line(e)}): {FRESH_BUNDLE}") from None
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list) or not config["icl_tasks"]:
        raise BundleError(f"{bundle_dir}/core.yaml has no icl_tasks list: {FRESH_BUNDLE}")
    baselines = _read_baselines(os.path.join(bundle_dir, "eval_meta_data.csv"))
    tasks = []
    for entry in config["icl_tasks"]:
        missing = [k for k in ("label", "icl_task_type", "dataset_uri") if k not in entry] if isinstance(entry, dict) else ["all"]
        if missing:
            raise BundleError(f"core.yaml task {entry} lacks {missing}: {FRESH_BUNDLE}")
        label, kind = entry["label"], entry["icl_task_type"]
        if kind not in ITEM_FIELDS:
            raise BundleError(f"core.yaml task {label}: icl_task_type {kind!r} is not one of {list(ITEM_FIELDS)}")
        shots = entry.get("num_fewshot", 0)
        shots = shots if isinstance(shots, list) else [shots]
        if len(shots) != 1 or not isinstance(shots[0], int) or shots[0] < 0:  # the CORE bundle lists one per task, e.g. [10]
            raise BundleError(f"core.yaml task {label}: num_fewshot must hold one integer >= 0, got {shots}")
        if label not in baselines:
            raise BundleError(f"task {label} has no row in eval_meta_data.csv (its random baseline)")
        if not 0 <= baselines[label] < 100:
            raise BundleError(f"task {label}: random baseline {baselines[label]}% must be in [0, 100)")
        tasks.append({
            "label": label,
            "icl_task_type": kind,
            "dataset_uri": entry["dataset_uri"],
            "data_path": os.path.join(bundle_dir, "eval_data", entry["dataset_uri"]),
            "num_fewshot": int(shots[0]),
            "continuation_delimiter": entry.get("continuation_delimiter", " "),
            "baseline_acc": baselines[label] / 100,
        })
    return tasks


def load_items(task):
    """The task's items (dicts) from its jsonl file, checked for the fields its type needs."""
    items, kind = [], task["icl_task_type"]
    try:
        with open(task["data_path"], encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"task {task['label']}: cannot read {task['data_path']} ({e}): {FRESH_BUNDLE}") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise BundleError(f"{task['data_path']}:{line_no} is not JSON ({e}): {FRESH_BUNDLE}") from None
        if not _item_is_valid(kind, item):
            raise BundleError(f"{task['data_path']}:{line_no}: a {kind} item needs {ITEM_FIELDS[kind]} "
                              f"with gold indexing its options: {FRESH_BUNDLE}")
        items.append(item)
    if len(items) <= task["num_fewshot"]:
        raise BundleError(f"task {task['label']}: {len(items)} items cannot give {task['num_fewshot']} few-shot "
                         "examples that exclude the item itself")
    return items


def _item_is_valid(kind, item):
    if not isinstance(item, dict) or any(k not in item for k in ITEM_FIELDS[kind]):
        return False
    options = item.get("choices", item.get("context_options"))
    return options is None or (isinstance(options, list) and isinstance(item["gold"], int) and 0 <= item["gold"] < len(options))

# -----------------------------------------------------------------------------
# prompts


def fewshot_indices(num_items, idx, num_fewshot):
    """num_fewshot distinct item indices other than idx, the same on every call and every rank."""
    rng = random.Random(FEWSHOT_SEED + idx)
    return [j + (j >= idx) for j in rng.sample(range(num_items - 1), num_fewshot)]  # skip over idx itself


def _render_multiple_choice(item, shots, delim):
    prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
    return [(prefix + item["query"] + delim, choice) for choice in item["choices"]], item["gold"]


def _render_schema(item, shots, delim):
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in shots)
    return [(prefix + option + delim, item["continuation"]) for option in item["context_options"]], item["gold"]


def _render_language_modeling(item, shots, delim):
    # contexts are stripped: some datasets end them with the space or newline the delimiter adds again
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in shots)
    return [(prefix + item["context"].strip() + delim, item["continuation"])], 0


RENDERERS = {
    "multiple_choice": _render_multiple_choice,
    "schema": _render_schema,
    "language_modeling": _render_language_modeling,
}


def render_item(task, items, idx):
    """([(context, answer) per candidate], gold candidate index) for item idx, few-shot examples included."""
    shots = [items[j] for j in fewshot_indices(len(items), idx, task["num_fewshot"])]
    pairs, gold = RENDERERS[task["icl_task_type"]](items[idx], shots, task["continuation_delimiter"])
    # trailing spaces go to the answer, where BPE expects them (" Paris" is one token, "Paris" another)
    return [(c.rstrip(" "), c[len(c.rstrip(" ")):] + a) for c, a in pairs], gold


def tokenize_pairs(tokenizer, pairs, max_seq_len):
    """[(ids, answer_start)] per (context, answer): ids = BOS + context + answer, at most max_seq_len long,
    context tokens dropped from the left (after BOS) when too long; ids[answer_start:] are the answer."""
    contexts = tokenizer.encode([c for c, _ in pairs])
    answers = tokenizer.encode([a for _, a in pairs])
    seqs = []
    for (context, answer), ctx_ids, ans_ids in zip(pairs, contexts, answers):
        if not ans_ids or len(ans_ids) >= max_seq_len:
            raise BundleError(f"answer {answer!r} is {len(ans_ids)} tokens: it must be 1 to {max_seq_len - 1} "
                              f"to fit a sequence of max_seq_len={max_seq_len} after BOS; drop that item from the "
                              "bundle or evaluate a model with a longer context")
        body = (ctx_ids + ans_ids)[-(max_seq_len - 1):]
        seqs.append(([tokenizer.bos_token_id] + body, 1 + len(body) - len(ans_ids)))
    return seqs

# -----------------------------------------------------------------------------
# scoring


@torch.no_grad()
def score_sequences(model, seqs, device, batch_tokens=EVAL_BATCH_TOKENS):
    """Per (ids, answer_start): the mean loss of the answer tokens (nats) and the probability that greedy
    decoding with random tie-breaking reproduces them, from one teacher-forced forward pass.

    Sequences are sorted by length and packed into right-padded batches of about batch_tokens tokens
    (causal attention: padding after a sequence cannot change its logits).
    """
    mean_loss, greedy_prob = [0.0] * len(seqs), [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    start = 0
    while start < len(order):
        width = len(seqs[order[start]][0])
        batch = order[start:start + max(1, batch_tokens // width)]
        start += len(batch)
        idx = torch.full((len(batch), width), seqs[batch[0]][0][0], dtype=torch.long)
        targets = torch.full((len(batch), width), -1, dtype=torch.long)
        for row, i in enumerate(batch):
            ids, answer_start = seqs[i]
            idx[row, :len(ids)] = torch.tensor(ids)
            # position t predicts token t + 1: the answer is predicted from answer_start - 1 on
            targets[row, answer_start - 1:len(ids) - 1] = idx[row, answer_start:len(ids)]
        idx, targets = idx.to(device), targets.to(device)
        losses, probs = _answer_stats(model(idx), targets)
        for row, i in enumerate(batch):
            mean_loss[i], greedy_prob[i] = losses[row], probs[row]
    return mean_loss, greedy_prob


def _answer_stats(logits, targets):
    """Per row: mean nll over positions with a target, and the product over them of P(greedy pick = target)."""
    rows, cols = (targets >= 0).nonzero(as_tuple=True)
    z = logits[rows, cols].float()  # (answer tokens, vocab): only these rows ever get a softmax
    gold = targets[rows, cols]
    gold_logit = z.gather(1, gold[:, None]).squeeze(1)
    nll = torch.logsumexp(z, dim=-1) - gold_logit
    top = z.max(dim=-1).values
    pick_prob = torch.where(gold_logit == top, 1.0 / (z == top[:, None]).sum(-1), 0.0)
    B = targets.size(0)
    nll_sum = torch.zeros(B, dtype=torch.float64, device=z.device).index_add_(0, rows, nll.double())
    count = torch.bincount(rows, minlength=B).double()
    prob = torch.ones(B, dtype=torch.float64, device=z.device).scatter_reduce_(0, rows, pick_prob.double(), "prod")
    return (nll_sum / count).tolist(), prob.tolist()


def item_credit(kind, mean_losses, greedy_probs, gold):
    """Expected correctness of one item in [0, 1] under random tie-breaking."""
    if kind == "language_modeling":
        return greedy_probs[0]
    best = min(mean_losses)
    tied = [i for i, loss in enumerate(mean_losses) if loss <= best + TIE_TOLERANCE_NATS]
    return (gold in tied) / len(tied)


def _rank_and_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(model, tokenizer, task, items, device, max_seq_len, max_items=-1, batch_tokens=EVAL_BATCH_TOKENS):
    """Accuracy of model (idx -> logits) on the first max_items items (-1: all), the same on every rank.

    Few-shot examples come from all of items. This rank scores items rank, rank + W, ... and the
    credit is all-reduced.
    """
    num_scored = len(items) if max_items < 0 else min(max_items, len(items))
    if num_scored == 0:
        raise ValueError(f"task {task['label']}: no items to evaluate")
    rank, world_size = _rank_and_world()
    rendered = [render_item(task, items, idx) for idx in range(rank, num_scored, world_size)]
    seqs = tokenize_pairs(tokenizer, [pair for pairs, _ in rendered for pair in pairs], max_seq_len)
    mean_loss, greedy_prob = score_sequences(model, seqs, device, batch_tokens)
    credit, pos = 0.0, 0
    for pairs, gold in rendered:
        span = slice(pos, pos + len(pairs))
        credit += item_credit(task["icl_task_type"], mean_loss[span], greedy_prob[span], gold)
        pos += len(pairs)
    credit = torch.tensor(credit, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(credit, op=dist.ReduceOp.SUM)
    return credit.item() / num_scored


def shuffled_items(task):
    """The task's items in the order evaluate_core scores them (and draws few-shot examples from)."""
    items = load_items(task)
    random.Random(SHUFFLE_SEED).shuffle(items)  # once per task, so max_per_task takes a fair sample
    return items


def item_predictions(model, tokenizer, task, items, device, max_seq_len, batch_tokens=EVAL_BATCH_TOKENS):
    """What evaluate_task scores, item by item (all of items, in this process): per item a dict with its
    candidates [(context, answer)], gold, per candidate mean_loss (nats per answer token) and answer_tokens,
    and credit. For cross-checks against other harnesses (dev/lm_eval); CORE itself only needs the sums."""
    rendered = [render_item(task, items, idx) for idx in range(len(items))]
    seqs = tokenize_pairs(tokenizer, [pair for pairs, _ in rendered for pair in pairs], max_seq_len)
    mean_loss, greedy_prob = score_sequences(model, seqs, device, batch_tokens)
    predictions, pos = [], 0
    for pairs, gold in rendered:
        span = slice(pos, pos + len(pairs))
        predictions.append({"candidates": pairs, "gold": gold, "mean_loss": mean_loss[span],
                            "answer_tokens": [len(ids) - start for ids, start in seqs[span]],
                            "credit": item_credit(task["icl_task_type"], mean_loss[span], greedy_prob[span], gold)})
        pos += len(pairs)
    return predictions


def evaluate_core(model, tokenizer, bundle_dir, device, max_seq_len, max_per_task=-1, print_fn=print,
                  batch_tokens=EVAL_BATCH_TOKENS):
    """CORE over every task of the bundle: {"core_metric", "results": {label: acc}, "centered": {label: acc}}.

    Each task's items are shuffled once (SHUFFLE_SEED) so max_per_task (-1: all) scores a fair sample.
    Pass the uncompiled model: sequence lengths vary and would recompile a compiled one.
    """
    results, centered = {}, {}
    for task in load_tasks(bundle_dir):
        t0 = time.time()
        items = shuffled_items(task)
        acc = evaluate_task(model, tokenizer, task, items, device, max_seq_len, max_per_task, batch_tokens)
        label, b = task["label"], task["baseline_acc"]
        results[label], centered[label] = acc, (acc - b) / (1 - b)
        num_scored = len(items) if max_per_task < 0 else min(max_per_task, len(items))
        print_fn(f"{label:<40} {task['num_fewshot']:>2}-shot {num_scored:>6} items | acc {acc:.4f} | "
                 f"centered {centered[label]:+.4f} | {time.time() - t0:.1f}s")
    core_metric = sum(centered.values()) / len(centered)
    print_fn(f"CORE metric: {core_metric:.4f}")
    return {"core_metric": core_metric, "results": results, "centered": centered}
