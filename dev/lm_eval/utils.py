"""lm-evaluation-harness tasks whose documents are nanochat's CORE items, rendered by nanochat.core_eval.

Each document is one item exactly as core_eval scores it: the same order (`shuffled_items`), the same
few-shot examples baked into each candidate's context (`render_item`: lm-eval's own samplers cannot draw
core_eval's per-item Random(1234 + idx) picks), and each candidate's answer with its leading space
(the YAMLs set target_delimiter: ""). So lm-eval and core_eval score the same (context, answer) strings:
- multiple_choice: one context, the choices as continuations;
- schema: lm-eval's "multiple input" form: doc_to_text returns the gold index, the candidates are the
  contexts, the shared continuation is the target.
The bundle is data/eval_bundle_mini unless `--metadata '{"bundle": "PATH"}'` names another.
"""

import datasets

from nanochat import core_eval


def core_docs(label, bundle=None, **_):
    """lm-eval's custom_dataset: {"test": the items of task `label`, one document per item}."""
    bundle = core_eval.find_bundle_root(bundle or core_eval.MINI_BUNDLE_DIR)
    task = next((t for t in core_eval.load_tasks(bundle) if t["label"] == label), None)
    if task is None:
        raise ValueError(f"the eval bundle {bundle} has no task {label!r}")
    items = core_eval.shuffled_items(task)
    docs = []
    for idx in range(len(items)):
        pairs, gold = core_eval.render_item(task, items, idx)
        docs.append({"idx": idx, "contexts": [c for c, _ in pairs], "answers": [a for _, a in pairs], "gold": gold})
    return {"test": datasets.Dataset.from_list(docs)}


def mc_context(doc):
    return doc["contexts"][0]  # every choice of a multiple-choice item shares it


def mc_choices(doc):
    return doc["answers"]


def schema_gold(doc):
    return doc["gold"]  # an int from doc_to_text: lm-eval's signal for one context per candidate


def schema_contexts(doc):
    return doc["contexts"]


def schema_continuation(doc):
    return doc["answers"][0]  # the same continuation under every context
