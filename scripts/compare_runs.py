"""Compare training runs on three axes at once: val bpb vs steps, vs training time, vs training FLOPs.

    python -m scripts.compare_runs RUN_A RUN_B [RUN_C ...] [--out compare.png] [--force]

A RUN is a run's name (base_train's --run, or the d<depth>-<time> name it printed; found under
<base>/runs), a run directory written by scripts/base_train.py (run.json + log.jsonl), a log.jsonl
path (its run.json is read from beside it when present), or a wandb run path
"entity/project/run_id" (needs network and a wandb login). The same run twice is refused.

What it does, in order:
1. Refuses (exit 1) when the runs' data signatures differ (tokenizer, sequence length, packing,
   data mixture, validation data, eval tokens): their val bpb numbers measure different things. --force turns
   the refusal into a loud warning, printed and stamped on the figure.
2. Writes one PNG: val bpb vs step, vs total_training_time, vs total_training_flops, and the
   smoothed train loss vs step; a dashed line marks the matched budget of each axis.
3. Prints a verdict per axis. Method:
   - matched budget = the largest budget every run reached on that axis (the smallest of the
     runs' last evaluations); each run's bpb there is linearly interpolated between its two
     nearest evaluations (exact for the run that stopped there). bpb curves are convex, so
     the chord sits slightly above the curve: evaluate often if the gap is small.
   - noise: sigma of one evaluation, per run, = RMS residual (n-3 degrees of freedom) of its
     last evaluations (the later half, at least 5) around a quadratic fit in log(step). Late
     bpb curves are near-quadratic in log(step), so the residual is evaluation-to-evaluation
     scatter, not curvature. The gap between two runs is "beyond noise" when it exceeds
     NOISE_SIGMAS x sqrt(sigma_a^2 + sigma_b^2).
   - the best run wins an axis only if its lead over the runner-up is beyond noise; a change
     wins overall only if the same run wins all three axes (NOTES: "improvements must hold on
     three axes at once"). A run with no val bpb (stopped before its first eval) gives no result,
     never a tie.
   Runs with different horizons are compared at the shorter one, i.e. the longer run before
   its LR warmdown has finished: give runs the same budget on the axis you care about.
4. Prints the settings that differ between the runs (run.json's args and resolved hyperparameters).
5. Prints an MFU health section per run (see `mfu_health`).
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from nanochat.cli import ArgumentParser, number
from nanochat.common import get_base_dir
from nanochat.report import MFU_HEALTHY, diagnose_low_mfu, read_jsonl
from nanochat.runs import RunDirError, list_runs, resolve_run_dir, runs_root

# what a val bpb depends on besides the model (written by base_train's data_signature()); a
# run's own extra signature keys are checked too: `data` (the --data mixture) is one, so runs on
# different mixtures are refused while runs logged before mixtures existed still compare among themselves
SIGNATURE_FIELDS = ("tokenizer", "sequence_len", "packing", "val_data", "eval_tokens")
AXES = (("step", "step"), ("total_training_time", "training time (s)"), ("total_training_flops", "training FLOPs"))
AXIS_NAMES = {"step": "step", "total_training_time": "time", "total_training_flops": "flops"}
NOISE_SIGMAS = 2.0  # ~95% two-sided for Gaussian scatter
NOISE_MIN_EVALS = 5  # the noise fit uses the later half of the evaluations, but at least this many
# run.json args that name or place a run, or say how its process started: not what it trains
NOT_SETTINGS = {"run", "run_dir", "resume_from_step", "overwrite", "allow_horizon_change", "dry_run"}
MAX_LISTED_DIFFERENCES = 8  # per line of the settings section; the rest are counted


@dataclass
class Run:
    label: str
    source: str
    info: dict  # run.json ({} when unknown)
    records: list  # log.jsonl records (wandb history rows for a wandb run)
    identity: str = ""  # what makes two sources the same run: the log's real path, or the wandb path

    @property
    def signature(self):
        return self.info.get("data_signature")


# -----------------------------------------------------------------------------
# loading

def read_run_json(path):
    with open(path) as f:
        return json.load(f)


def read_run_file(path, reader, check):
    """reader(path), refused with one line when unreadable or when check(content) fails: not a run's file."""
    try:
        content = reader(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path} cannot be read ({e}): pass a run directory or log.jsonl written by scripts.base_train") from None
    if not check(content):
        raise SystemExit(f"{path} does not hold what scripts.base_train writes (JSON objects): pass a run directory or "
                         "log.jsonl written by it")
    return content


def load_run(source):
    """A Run from a run directory, a log.jsonl path, a wandb run path "entity/project/run_id", or a run name."""
    if not os.path.exists(source) and os.sep not in source.strip(os.sep):
        try:  # a run's name, as base_train printed it
            source = resolve_run_dir(source, get_base_dir())
        except RunDirError:
            base = get_base_dir()
            raise SystemExit(f"{source}: no such run under {runs_root(base)} (latest there: "
                             f"{', '.join(list_runs(base)[-5:]) or 'none'}), and no such directory or log file") from None
    if os.path.isdir(source):
        log_path = os.path.join(source, "log.jsonl")
        if not os.path.isfile(log_path):
            raise SystemExit(f"{source} is a directory without log.jsonl: pass a run directory written by scripts.base_train")
    elif os.path.isfile(source):
        log_path = source
    elif len(source.strip("/").split("/")) == 3:
        return load_wandb_run(source.strip("/"))
    else:
        raise SystemExit(f"{source}: no such run, run directory or log file (a wandb run is given as entity/project/run_id)")
    run_dir = os.path.dirname(os.path.abspath(log_path))
    info_path = os.path.join(run_dir, "run.json")
    info = read_run_file(info_path, read_run_json, lambda d: isinstance(d, dict)) if os.path.isfile(info_path) else {}
    records = read_run_file(log_path, read_jsonl, lambda rs: all(isinstance(r, dict) for r in rs))
    return Run(os.path.basename(run_dir), source, info, records, os.path.realpath(log_path))


def load_wandb_run(path):
    """Reads a run logged by RunLog from wandb: its config is run.json's content, its history the log records."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        raise SystemExit(f"{path}: not a local path, and reading it as a wandb run needs network access "
                         f"(WANDB_MODE={os.environ['WANDB_MODE']}); pass the local run directory instead")
    try:
        import wandb
        wandb_run = wandb.Api(timeout=30).run(path)
        records = [dict(row) for row in wandb_run.scan_history()]
        info = dict(wandb_run.config)
        name = wandb_run.name
    except Exception as e:  # no network, no login, no such run: all end the same way for the user
        raise SystemExit(f"{path}: not a local path, and reading it as a wandb run failed ({type(e).__name__}: {e}). "
                         "That needs network access and a wandb login (WANDB_API_KEY); offline, pass the local run "
                         "directory (run.json + log.jsonl) instead") from None
    for r in records:
        r.setdefault("step", r.get("_step"))
    return Run(name or path, path, info, records, path)


def refuse_repeats(runs):
    """One line when a run is given twice (a name and its path, a dir and its log.jsonl): it would only tie itself."""
    seen = {}
    for run in runs:
        if run.identity in seen:
            raise SystemExit(f"{seen[run.identity]} and {run.source} are the same run ({run.identity}): "
                             "pass two different runs")
        seen[run.identity] = run.source


def disambiguate_labels(runs):
    """Two runs in directories of the same name get their full sources as labels."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = r.source


# -----------------------------------------------------------------------------
# data signatures

def signature_mismatches(runs):
    """Names of the data-signature fields that differ between runs (a missing signature differs in all of them)."""
    signatures = [r.signature or {} for r in runs]
    keys = set(SIGNATURE_FIELDS).union(*signatures)
    return sorted(k for k in keys if any(k not in s or s[k] != signatures[0][k] for s in signatures))


def describe_mismatches(runs, fields):
    """One line: the fields, then each field's value per run."""
    values = [f"{k}: " + ", ".join(f"{r.label}={(r.signature or {}).get(k, '<missing: no run.json/data_signature>')}"
                                   for r in runs) for k in fields]
    return (f"runs differ in data_signature field(s) {', '.join(fields)}, so their val bpb values are not comparable "
            f"({'; '.join(values)})")


# -----------------------------------------------------------------------------
# curves, noise, verdicts

def curve(records, x_key, y_key="val/bpb"):
    """(xs, ys) of the records that have finite values of both keys, sorted by x; a repeated x keeps its last record."""
    points = {}
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            points[x] = y
    xs = np.array(sorted(points), dtype=float)
    return xs, np.array([points[x] for x in xs], dtype=float)


def eval_noise(steps, bpbs, min_evals=NOISE_MIN_EVALS):
    """Sigma of one evaluation: RMS residual (n-3 dof) of the later evaluations around a quadratic in log(step).

    Uses evaluations after step 0, the later half of them but at least `min_evals`. None with
    fewer than 4 such evaluations (a quadratic needs 3 points plus one to measure scatter).
    """
    keep = steps > 0
    steps, bpbs = steps[keep], bpbs[keep]
    n = min(len(steps), max(min_evals, math.ceil(len(steps) / 2)))
    if n < 4:
        return None
    u, y = np.log(steps[-n:]), bpbs[-n:]
    residuals = y - np.polyval(np.polyfit(u, y, 2), u)
    return float(np.sqrt(np.sum(residuals ** 2) / (n - 3)))


def first_reach(xs, ys, target):
    """The first budget at which the linearly interpolated curve gets down to `target`, or None."""
    for i in range(len(xs)):
        if ys[i] <= target:
            if i == 0:
                return float(xs[0])
            return float(xs[i - 1] + (xs[i] - xs[i - 1]) * (ys[i - 1] - target) / (ys[i - 1] - ys[i]))
    return None


def compare_axis(runs, x_key, noise_sigmas=NOISE_SIGMAS):
    """The verdict on one axis: each run's bpb at the matched budget, the best, its lead, and whether it is beyond noise.

    Returns a dict: axis, budget, bpb (label -> value), best, runner_up, gap, gap_noise,
    beyond_noise (None when noise is unknown), winner (best if not within noise, else None),
    budget_ratio (fraction of the budget the best run needed to reach the runner-up's bpb),
    note (why there is no verdict, if there is none), missing (the runs without val bpb on this axis).
    """
    curves = {r.label: curve(r.records, x_key) for r in runs}
    verdict = {"axis": AXIS_NAMES.get(x_key, x_key), "x_key": x_key, "budget": None, "bpb": {}, "best": None,
               "runner_up": None, "gap": None, "gap_noise": None, "beyond_noise": None, "winner": None,
               "budget_ratio": None, "note": "", "missing": []}
    empty = [label for label, (xs, _) in curves.items() if len(xs) == 0]
    if empty:
        verdict.update(note=f"no val/bpb with {x_key} in: {', '.join(empty)}", missing=empty)
        return verdict
    budget = min(xs[-1] for xs, _ in curves.values())
    late_starters = [label for label, (xs, _) in curves.items() if xs[0] > budget]
    if late_starters:
        verdict["note"] = f"no shared budget: first eval of {', '.join(late_starters)} is past {budget:.4g}"
        return verdict
    bpb = {label: float(np.interp(budget, xs, ys)) for label, (xs, ys) in curves.items()}
    ranked = sorted(bpb, key=bpb.get)
    best, runner_up = ranked[0], ranked[1]
    gap = bpb[runner_up] - bpb[best]
    sigmas = {r.label: eval_noise(*curve(r.records, "step")) for r in runs}
    verdict.update(budget=float(budget), bpb=bpb, best=best, runner_up=runner_up, gap=gap)
    if sigmas[best] is not None and sigmas[runner_up] is not None:
        verdict["gap_noise"] = noise_sigmas * math.hypot(sigmas[best], sigmas[runner_up])
        verdict["beyond_noise"] = gap > verdict["gap_noise"]
    verdict["winner"] = best if verdict["beyond_noise"] else None  # unknown noise is no win
    reached = first_reach(*curves[best], bpb[runner_up])
    if reached is not None and budget > 0:
        verdict["budget_ratio"] = reached / budget
    return verdict


def axis_result(verdict):
    """An axis in the summary: its winner, 'tie' (compared, within noise or noise unknown), or 'no result'."""
    if verdict["best"] is None:
        return "no result"
    return verdict["winner"] or "tie"


def overall_verdict(verdicts):
    """One line: a run wins only if it wins (beyond noise) on every axis; no result on an axis is said as such."""
    winners = [v["winner"] for v in verdicts]
    summary = ", ".join(f"{v['axis']}: {axis_result(v)}" for v in verdicts)
    if verdicts and all(v["best"] is None for v in verdicts):
        missing = list(dict.fromkeys(label for v in verdicts for label in v["missing"]))
        why = (f"{', '.join(missing)} has no val bpb (stopped before its first eval?)" if missing else verdicts[0]["note"])
        return f"overall: no result — {why}: nothing to compare"
    if winners and winners[0] is not None and all(w == winners[0] for w in winners):
        return f"overall: {winners[0]} WINS on all three axes"
    unsure = [v["axis"] for v in verdicts if v["beyond_noise"] is None and v["best"] is not None]
    leaders = {v["best"] for v in verdicts}
    if unsure and len(leaders) == 1 and None not in leaders:
        return (f"overall: {leaders.pop()} is lower on all three axes, but the eval noise is unknown on "
                f"{', '.join(unsure)} (too few evals): no verdict — evaluate more often (--eval-every)")
    line = f"overall: no run wins on all three axes ({summary})"
    # a pure speed-up ties per step and per FLOP: say so, without calling it a win
    for label in dict.fromkeys(w for w in winners if w):
        if all(v["winner"] == label or (v["winner"] is None and label in (v["best"], v["runner_up"])) for v in verdicts):
            won = [v["axis"] for v in verdicts if v["winner"] == label]
            line += f"; {label} wins on {', '.join(won)} and is within noise on the rest"
    return line


# -----------------------------------------------------------------------------
# settings

def setting_differences(runs, section, ignore=()):
    """[(key, [value per run])] of run.json[section] (args or hyperparameters) that differ between runs, in key order.
    A run without the key (or without run.json) shows None there."""
    tables = [run.info.get(section) or {} for run in runs]
    keys = sorted(set().union(*tables) - set(ignore))
    return [(k, [t.get(k) for t in tables]) for k in keys if any(t.get(k) != tables[0].get(k) for t in tables)]


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def format_setting_differences(runs):
    """Two lines: the flags that differ (run.json args, as --flag) and the resolved hyperparameters that differ."""
    unknown = [r.label for r in runs if not r.info.get("args")]
    if unknown:
        return f"settings: unknown for {', '.join(unknown)} (no run.json with args)"
    lines = []
    for section, title, name in (("args", "flags", lambda k: "--" + k.replace("_", "-")),
                                 ("hyperparameters", "resolved hyperparameters", str)):
        diffs = setting_differences(runs, section, NOT_SETTINGS if section == "args" else ())
        shown = [f"{name(k)} " + " | ".join(f"{r.label}={format_value(v)}" for r, v in zip(runs, values))
                 for k, values in diffs[:MAX_LISTED_DIFFERENCES]]
        more = f"; and {len(diffs) - MAX_LISTED_DIFFERENCES} more" if len(diffs) > MAX_LISTED_DIFFERENCES else ""
        lines.append(f"{title} that differ: " + ("; ".join(shown) + more if diffs else "none"))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# MFU health

def mfu_health(run, skip_steps=5):
    """Per-run step-time health over train records past `skip_steps` (first steps carry one-off costs).

    MFU is time-weighted (sum of mfu*dt / sum of dt = the MFU of the average step), the data and
    optimizer fractions are shares of total step time (the optimizer share includes gradient sync).
    """
    train = [r for r in run.records if r.get("train/dt") and (r.get("step") or 0) > skip_steps]
    device = run.info.get("device") or {}
    health = {"label": run.label, "steps": len(train), "device_type": device.get("type"), "device_name": device.get("name"),
              "world_size": device.get("world_size"), "peak_flops": device.get("peak_flops"),
              "compute_dtype": (run.info.get("hyperparameters") or {}).get("compute_dtype"),
              "mfu": None, "data_wait_frac": None, "optim_frac": None, "tok_per_sec": None, "skipped_steps": 0,
              "diagnosis": ""}
    if not train:
        return health
    total_s = sum(r["train/dt"] for r in train)
    with_mfu = [r for r in train if r.get("train/mfu") is not None]
    if with_mfu:
        health["mfu"] = sum(r["train/mfu"] * r["train/dt"] for r in with_mfu) / sum(r["train/dt"] for r in with_mfu)
    if all(r.get("train/dt_data") is not None for r in train):
        health["data_wait_frac"] = sum(r["train/dt_data"] for r in train) / total_s
    if all(r.get("train/dt_optim") is not None for r in train):
        health["optim_frac"] = sum(r["train/dt_optim"] for r in train) / total_s
    if all(r.get("train/tok_per_sec") for r in train):
        health["tok_per_sec"] = len(train) / sum(1 / r["train/tok_per_sec"] for r in train)  # tokens/time, not mean of rates
    health["skipped_steps"] = sum(bool(r.get("train/skipped")) for r in train)
    if health["device_type"] == "cuda" and health["mfu"] is not None and None not in (health["data_wait_frac"], health["optim_frac"]):
        args = run.info.get("args") or {}
        tokens_per_micro_step = (args.get("device_batch_size") or 0) * (args.get("max_seq_len") or 0) or "an unknown number of"
        health["diagnosis"] = diagnose_low_mfu(health["mfu"], health["data_wait_frac"], health["optim_frac"], tokens_per_micro_step)
    return health


def format_mfu_health(health):
    pct = lambda v: "n/a" if v is None else f"{v:.1%}"
    h = health
    if h["device_type"] == "cuda":
        where = f"{h['device_name']} x{h['world_size']}"
        mfu_text = f"MFU {pct(h['mfu'])}" + ("" if h["mfu"] is None else f" of {h['peak_flops']:.3g} FLOP/s per GPU "
                                           f"({'healthy' if h['mfu'] >= MFU_HEALTHY else f'below {MFU_HEALTHY:.0%}'})")
    elif h["device_type"] == "cpu":
        where = f"cpu x{h['world_size']}"
        mfu_text = f"MFU {pct(h['mfu'])}" + ("" if h["mfu"] is None else
                                           f" of the measured CPU {h['compute_dtype'] or ''} matmul peak {h['peak_flops']:.3g} FLOP/s")
    else:
        where, mfu_text = h["device_type"] or "unknown device", f"MFU {pct(h['mfu'])}"
    if h["mfu"] is None and h["steps"]:
        mfu_text += " (peak FLOP/s unknown)"
    tok = "n/a" if h["tok_per_sec"] is None else f"{h['tok_per_sec']:,.0f}"
    line = (f"  {h['label']}: {where}, {h['steps']} timed steps | {mfu_text} | data wait {pct(h['data_wait_frac'])} | "
            f"optimizer+sync {pct(h['optim_frac'])} | {tok} tok/s | {h['skipped_steps']} skipped steps")
    return line + (f"\n    -> {h['diagnosis']}" if h["diagnosis"] else "")


# -----------------------------------------------------------------------------
# output

def format_number(value, x_key):
    if value is None:
        return "-"
    if x_key == "step":
        return f"{value:,.0f}"
    if x_key == "total_training_time":
        return f"{value:,.1f}s"
    return f"{value:.3e}"


def format_verdict_table(runs, verdicts, noise_sigmas=NOISE_SIGMAS):
    labels = [r.label for r in runs]
    width = max(10, *(len(label) for label in labels))
    sigmas = {r.label: eval_noise(*curve(r.records, "step")) for r in runs}
    threshold = f"{noise_sigmas:g}σ noise"  # the column's name says what it is: the threshold a lead must pass
    lines = ["val/bpb at matched budget (interpolated; lower is better). noise sigma per eval: "
             + ", ".join(f"{label} {'n/a' if s is None else f'{s:.4f}'}" for label, s in sigmas.items())
             + f"; '{threshold}' = {noise_sigmas:g} x sqrt(sigma_best^2 + sigma_next^2), the threshold a lead must exceed",
             f"{'axis':<6} {'budget':>12}  " + "  ".join(f"{label:>{width}}" for label in labels)
             + f"  {'best':>{width}} {'lead':>8} {threshold:>10}  verdict"]
    for v in verdicts:
        if v["best"] is None:
            lines.append(f"{v['axis']:<6} {'-':>12}  no result: {v['note']}")
            continue
        cells = "  ".join(f"{v['bpb'][label]:>{width}.4f}" for label in labels)
        noise = "n/a" if v["gap_noise"] is None else f"{v['gap_noise']:.4f}"
        if v["beyond_noise"] is False:
            text = f"tie: {v['best']} lower by {v['gap']:.4f}, within noise"
        else:
            text = f"{v['best']} lower (noise unknown: too few evals)" if v["beyond_noise"] is None else f"{v['best']} wins"
            if v["budget_ratio"] is not None:
                text += f"; reaches {v['runner_up']}'s bpb at {v['budget_ratio']:.2f}x the {v['axis']} budget"
        lines.append(f"{v['axis']:<6} {format_number(v['budget'], v['x_key']):>12}  {cells}  "
                     f"{v['best']:>{width}} {v['gap']:>8.4f} {noise:>10}  {text}")
    lines.append(overall_verdict(verdicts))
    return "\n".join(lines)


def zoom_inset(ax, runs, x_key, budget):
    """An inset of the evaluations after step 0: the main panel shows every point, the untrained step-0 one
    included, which squeezes the late curves, where runs differ, into a sliver."""
    curves = [curve(run.records, x_key) for run in runs]
    late = [(xs[xs > 0], ys[xs > 0]) for xs, ys in curves]
    if not any(len(xs) > 1 for xs, _ in late):
        return None
    top = max(ys[0] for _, ys in late if len(ys))
    bottom = min(ys.min() for _, ys in late if len(ys))
    inset = ax.inset_axes([0.45, 0.42, 0.52, 0.5])
    for (xs, ys), run in zip(late, runs):
        inset.plot(xs, ys, marker="o", markersize=2, label=run.label)
    if budget is not None:
        inset.axvline(budget, color="gray", linestyle="--", linewidth=1)
    inset.set_ylim(bottom - 0.02 * (top - bottom + 1e-9), top + 0.02 * (top - bottom + 1e-9))
    inset.set_title("after step 0", fontsize=8)
    inset.tick_params(labelsize=7)
    inset.grid(alpha=0.3)
    return inset


def draw_figure(runs, verdicts, warning=""):
    """The figure: val bpb vs each axis (every evaluation in range, with a zoomed inset of the later ones) and the
    smoothed train loss vs step."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed, and never a GUI window from a script
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = list(zip(axes.flat[:3], AXES, verdicts))
    for ax, (x_key, x_label), verdict in panels:
        for run in runs:
            xs, ys = curve(run.records, x_key)
            ax.plot(xs, ys, marker="o", markersize=3, label=run.label)
        if verdict["budget"] is not None:
            ax.axvline(verdict["budget"], color="gray", linestyle="--", linewidth=1, label="matched budget")
            ax.set_title(f"val bpb vs {x_label}: " + (f"{verdict['winner']} wins" if verdict["winner"] else "no winner beyond noise"))
        else:
            ax.set_title(f"val bpb vs {x_label}: no result ({verdict['note']})")
        zoom_inset(ax, runs, x_key, verdict["budget"])
        ax.set_xlabel(x_label)
        ax.set_ylabel("val bpb")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes.flat[3]
    for run in runs:
        xs, ys = curve(run.records, "step", "train/loss_smooth")
        ax.plot(xs, ys, label=run.label)
    ax.set_title("train loss (smoothed) vs step")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    if warning:
        fig.suptitle(warning, color="red", fontweight="bold")
    fig.tight_layout()
    return fig


def plot_runs(runs, verdicts, out_path, warning=""):
    """One PNG of draw_figure(). Written via a temp file, then renamed."""
    import matplotlib.pyplot as plt
    fig = draw_figure(runs, verdicts, warning)
    tmp = f"{out_path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description="Compare runs on val bpb vs steps, time and FLOPs; check MFU health.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="2 or more runs: names under <base>/runs (as base_train printed them), run "
                   "directories, log.jsonl files or wandb paths entity/project/run_id")
    p.add_argument("--out", default="compare.png", help="where to write the PNG")
    p.add_argument("--force", action="store_true", help="compare even when data signatures differ (prints a loud warning)")
    p.add_argument("--noise-sigmas", type=number(float, low=0.0), default=NOISE_SIGMAS, help="a lead counts when above this many sigmas of the gap's noise")
    p.add_argument("--mfu-skip-steps", type=number(int, low=0), default=5, help="leave the first N steps out of the MFU health section")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs to compare")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: {'a directory' if os.path.isdir(args.out) else f'no directory {out_dir}'}; "
                "pass a PNG path in an existing directory")
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = [load_run(source) for source in args.runs]
    refuse_repeats(runs)
    disambiguate_labels(runs)
    warning = ""
    mismatched = signature_mismatches(runs)
    if mismatched:
        message = describe_mismatches(runs, mismatched)
        if not args.force:
            raise SystemExit(f"refusing to compare: {message}; pass --force to compare anyway")
        warning = f"DATA SIGNATURES DIFFER ({', '.join(mismatched)}): not an apples-to-apples comparison"
        print(f"{'!' * 80}\nWARNING (--force): {message}\n{'!' * 80}", file=sys.stderr)
    verdicts = [compare_axis(runs, x_key, args.noise_sigmas) for x_key, _ in AXES]
    print(format_verdict_table(runs, verdicts, args.noise_sigmas))
    print("\n" + format_setting_differences(runs))
    print(f"\nMFU health (steps > {args.mfu_skip_steps}):")
    for run in runs:
        print(format_mfu_health(mfu_health(run, args.mfu_skip_steps)))
    plot_runs(runs, verdicts, args.out, warning)
    print(f"\nwrote {args.out}")
    return verdicts


if __name__ == "__main__":
    main()
