"""Does an idea survive scale and noise? A baseline and changes over a depth ladder and seeds, as one command.

    python -m scripts.sweep --out SWEEP_DIR --depths 2,4,6 --seeds 3 \\
        --baseline "fp32: NANOCHAT_DTYPE=float32" --change "bf16: NANOCHAT_DTYPE=bfloat16" \\
        [--wrap "flock /tmp/nanochat-bench.lock"] [--devices 0,1,2,3] [--nproc-per-node 8] \\
        -- --max-seq-len 128 --num-iterations 80 --eval-every 10 ...   # base_train flags every run shares
    python -m scripts.sweep --out DIR --scaling-law --depths 2,4,6 --ratios 2,4,8,16 -- ...
    python -m scripts.sweep --out DIR --report-only ...                 # tables + PNG from the runs on disk

An arm (--baseline, each --change) is "NAME: TOKENS": KEY=VALUE tokens are environment variables,
the rest are base_train flags, appended after the shared ones (so they win). Every (arm, depth,
seed) is one base_train run in SWEEP_DIR/runs/ARM/d<depth>_s<seed>; the seed is both the
weight-init seed and the data-order seed (`--seed S --data-seed S`), so a baseline and a change
at the same seed see the same init and the same data order, and their difference is paired.

A run is complete when its log.jsonl holds a finite val/bpb at step == the num_iterations its
run.json records (base_train evaluates once more after its last step, then finishes) and its
sweep_run.json (the base_train argv without --run-dir, plus the arm's environment) matches
what this sweep would run. Complete runs are skipped, so a killed sweep resumes where it
stopped; a half-finished run is rerun from scratch (--overwrite); a complete run made by a different command
is refused (use another --out or delete it).

Before starting it prints each pending command and the time they would take: FLOPs from
GPT.estimate_flops and base_train's own horizon/batch resolution, at --flops-per-s, else the
FLOP/s the sweep's finished runs achieved, else the device peak times an assumed MFU.
Runs go one at a time (CPU), one per device of --devices in parallel (CUDA_VISIBLE_DEVICES),
or as torchrun runs on --nproc-per-node devices each. Each run's output goes to its train.log.

Report (printed, and written to SWEEP_DIR/report.txt + sweep.png): per change and depth, the
paired difference change - baseline in val bpb at matched steps, time and FLOPs (compare_runs'
matched-budget interpolation), mean, standard error and t over seeds; across depths, a least-
squares line of the mean difference against log10 FLOPs (--trend inverse: against 1/FLOPs) and
where it predicts the difference reaches zero. --scaling-law instead fits L(N, D) =
E + A/N^alpha + B/D^beta to the final val bpb of the ladder trained at several tokens:params
ratios, and reports the compute-optimal ratio and the loss-vs-FLOPs power law.
"""

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from nanochat import sweep as stats
from nanochat.cli import ArgumentParser
from scripts.compare_runs import AXES, compare_axis, load_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# set per run by the sweep
SWEEP_OWNED_FLAGS = ("--depth", "--seed", "--data-seed", "--run-dir", "--run", "--overwrite", "--resume-from-step")
# per run: no CORE, no samples, no checkpoints (a run is cheap to redo; the sweep compares val bpb)
FIXED_FLAGS = ["--core-metric-every", "0", "--sample-every", "0", "--save-every", "0"]
REFERENCE_RATIOS = {"notes (Kaplan-style)": 10.5, "reference default": 12.0, "speedrun": 8.0}
SIGNATURE_FILE = "sweep_run.json"


class SweepError(RuntimeError):
    """Bad sweep input or state; the message says what to do."""


@dataclass
class Arm:
    name: str
    env: dict = field(default_factory=dict)
    flags: list = field(default_factory=list)


@dataclass
class RunSpec:
    arm: Arm
    depth: int
    seed: int
    ratio: float = None  # --scaling-law only

    @property
    def name(self):
        ratio = "" if self.ratio is None else f"_r{self.ratio:g}"
        return f"{self.arm.name}/d{self.depth}{ratio}_s{self.seed}"


def parse_arm(text, default_name):
    """"NAME: KEY=VALUE --flag value ..." -> Arm; the name is optional for the baseline."""
    name, sep, rest = text.partition(":")
    if not sep or " " in name.strip() or "=" in name or name.strip().startswith("-"):
        name, rest = default_name, text
    name = name.strip() or default_name
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SweepError(f"arm name {name!r}: use letters, digits, - _ . (it names a directory)")
    env, flags = {}, []
    for token in shlex.split(rest):
        key, eq, value = token.partition("=")
        if eq and not key.startswith("-") and key.isidentifier():
            env[key] = value
        else:
            flags.append(token)
    owned = [f for f in flags if f.split("=")[0] in SWEEP_OWNED_FLAGS]
    if owned:
        raise SweepError(f"arm {name!r} sets {', '.join(owned)}: the sweep sets those per run (use --depths/--seeds)")
    return Arm(name, env, flags)


def plan_runs(baseline, changes, depths, seeds, ratios=None):
    """Every run, smallest depth first, arms interleaved per seed (a partial sweep already has pairs)."""
    runs = []
    for depth in depths:
        for ratio in ratios or [None]:
            for seed in seeds:
                runs += [RunSpec(arm, depth, seed, ratio) for arm in [baseline, *changes]]
    return runs


def run_dir(out_dir, spec):
    return os.path.join(out_dir, "runs", spec.name)


def train_argv(spec, base_flags):
    """base_train's arguments for one run, without --run-dir (that is added at launch)."""
    argv = ["--depth", str(spec.depth), "--seed", str(spec.seed), "--data-seed", str(spec.seed), *FIXED_FLAGS,
            *base_flags]
    if spec.ratio is not None:
        argv += ["--target-param-data-ratio", f"{spec.ratio:g}"]
    return argv + spec.arm.flags


def run_signature(spec, base_flags):
    return {"argv": train_argv(spec, base_flags), "env": dict(sorted(spec.arm.env.items()))}


def launch_command(spec, base_flags, out_dir, wrap=(), nproc_per_node=1):
    """The argv that runs one training run (wrapper, torchrun when asked, base_train and its flags)."""
    # only unfinished runs are launched, and they start afresh: --overwrite deletes the checkpoint a killed attempt
    # saved on its way out (base_train does so on SIGTERM even at --save-every 0), which it would refuse to clobber
    argv = train_argv(spec, base_flags) + ["--overwrite", "--run-dir", run_dir(out_dir, spec)]
    if nproc_per_node > 1:
        # `--` keeps torchrun from reading base_train's flags as its own
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
                    "-m", "scripts.base_train", "--"]
    else:
        launcher = [sys.executable, "-m", "scripts.base_train"]
    return [*wrap, *launcher, *argv]


def format_command(argv, env):
    """A copy-pasteable shell line: VAR=value ... command."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


# -----------------------------------------------------------------------------
# completion

def final_val_bpb(directory):
    """The val bpb at the run's last step (run.json's num_iterations), or None if the run did not get there."""
    try:
        with open(os.path.join(directory, "run.json")) as f:
            num_iterations = json.load(f)["hyperparameters"]["num_iterations"]
        with open(os.path.join(directory, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for r in reversed(records):
        bpb = r.get("val/bpb")
        if r.get("step") == num_iterations and isinstance(bpb, (int, float)) and math.isfinite(bpb):
            return float(bpb)
    return None


def run_status(directory, signature):
    """"done" (skip it) or "todo" (run it from scratch). Raises SweepError for a complete run of another command."""
    if final_val_bpb(directory) is None:
        return "todo"
    try:
        with open(os.path.join(directory, SIGNATURE_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if saved != signature:
        raise SweepError(f"{directory} holds a finished run of a different command (saved {saved}, now {signature}): "
                         "use another --out, or delete that run directory to redo it")
    return "done"


# -----------------------------------------------------------------------------
# estimate

def run_flops(spec, base_flags, vocab_size, world_size):
    """(training FLOPs + evaluation FLOPs, hyperparameters) of one run, resolved exactly as base_train resolves them."""
    import torch
    from scripts import base_train
    from nanochat.gpt import GPT
    args = base_train.parse_args(train_argv(spec, base_flags))
    with torch.device("meta"):
        model = GPT(base_train.build_config(args, vocab_size))
    hp = base_train.resolve_hyperparameters(args, model, world_size)
    evals = 2 + (hp["num_iterations"] // args.eval_every if args.eval_every > 0 else 0)
    eval_tokens = max(args.device_batch_size * args.max_seq_len * world_size, args.eval_tokens)
    eval_flops = evals * eval_tokens * hp["flops_per_token"] / 3  # forward only: ~1/3 of fwd+bwd
    return hp["training_flops"] + eval_flops, hp


def achieved_flops_per_s(directories):
    """Training FLOPs / training time summed over finished runs, or None when there are none."""
    flops = seconds = 0.0
    for d in directories:
        if final_val_bpb(d) is None:
            continue
        last = [r for r in load_run(d).records if r.get("total_training_time")]
        if last:
            flops += last[-1]["total_training_flops"]
            seconds += last[-1]["total_training_time"]
    return flops / seconds if seconds > 0 else None


def flops_rate(args, done_dirs):
    """(FLOP/s used for the estimate, where it came from)."""
    if args.flops_per_s > 0:
        return args.flops_per_s, "--flops-per-s"
    measured = achieved_flops_per_s(done_dirs)
    if measured:
        return measured, f"achieved by this sweep's {len(done_dirs)} finished run(s)"
    import torch
    from nanochat.common import peak_flops
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, source = peak_flops(device)
    if not peak:
        raise SweepError(f"unknown peak FLOP/s ({source}): pass --flops-per-s")
    per_device = peak * args.assumed_mfu
    return per_device * args.nproc_per_node, f"{source} {peak:.3g} x assumed MFU {args.assumed_mfu:g}"


def estimate_seconds(pending, base_flags, args, vocab_size, rate, parallel):
    """Wall seconds for the pending runs: FLOPs / rate + per-run overhead, spread over the parallel slots."""
    per_run = []
    for spec in pending:
        flops, _ = run_flops(spec, base_flags, vocab_size, args.nproc_per_node)
        per_run.append(flops / rate + args.overhead_s)
    return sum(per_run) / parallel, per_run


# -----------------------------------------------------------------------------
# execution

def device_slots(devices, nproc_per_node, n_cpus=None):
    """The environment of each parallel slot: [{}] on one device, else CUDA_VISIBLE_DEVICES groups of nproc_per_node,
    each with its share of the CPU threads (OMP_NUM_THREADS, unless already set). Without the share every run
    takes all cores: two d4 runs of 2 threads each on a 2-core CPU ran 3x slower than of 1 (dev/LOG.md 2026-12-03)."""
    if not devices:
        return [{}]
    if len(devices) % nproc_per_node:
        raise SweepError(f"--devices lists {len(devices)} device(s), not a multiple of --nproc-per-node {nproc_per_node}")
    n_cpus = n_cpus or len(os.sched_getaffinity(0))  # each run's process (a torchrun rank) gets one device's share
    threads = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(max(1, n_cpus // len(devices)))}
    return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[i:i + nproc_per_node]), **threads}
            for i in range(0, len(devices), nproc_per_node)]


def execute(todo, base_flags, args, out_dir):
    """Runs `todo` (one per slot at a time); returns the names of runs that ended without a final val bpb."""
    slots = device_slots(args.devices, args.nproc_per_node)
    free, running, failed = list(slots), {}, []
    queue = list(todo)
    commands_log = open(os.path.join(out_dir, "commands.log"), "a")
    started = time.time()

    def finish(proc):
        spec, slot, t0, log = running.pop(proc)
        log.close()
        free.append(slot)
        bpb = final_val_bpb(run_dir(out_dir, spec))
        if bpb is None:
            failed.append(spec.name)
            print(f"  FAILED {spec.name} (exit {proc.returncode}); see {os.path.join(run_dir(out_dir, spec), 'train.log')}")
        else:
            print(f"  done {spec.name}: val bpb {bpb:.4f} in {time.time() - t0:.0f}s")

    try:
        while queue or running:
            while queue and free:
                spec, slot = queue.pop(0), free.pop(0)
                directory = run_dir(out_dir, spec)
                os.makedirs(directory, exist_ok=True)
                with open(os.path.join(directory, SIGNATURE_FILE), "w") as f:
                    json.dump(run_signature(spec, base_flags), f)
                argv = launch_command(spec, base_flags, out_dir, args.wrap, args.nproc_per_node)
                env_shown = {**slot, **spec.arm.env}
                line = format_command(argv, env_shown)
                print(f"[run {len(todo) - len(queue)}/{len(todo)} | {(time.time() - started) / 60:.1f}m] {line}", flush=True)
                commands_log.write(line + "\n")
                commands_log.flush()
                log = open(os.path.join(directory, "train.log"), "w")
                # own session: a kill of the sweep takes the wrapper, torchrun and their children with it
                proc = subprocess.Popen(argv, cwd=REPO_ROOT, env={**os.environ, **env_shown}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                running[proc] = (spec, slot, time.time(), log)
            for proc in [p for p in running if p.poll() is not None]:
                finish(proc)
            time.sleep(0.2)
    finally:
        for proc in list(running):  # interrupted: stop what is in flight (it will be rerun next time)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait()
            running[proc][3].close()
        commands_log.close()
    return failed


# -----------------------------------------------------------------------------
# report: paired differences

def paired_table(out_dir, baseline, change, depths, seeds):
    """Per depth: flops, baseline bpb, and per axis the paired stats + per-seed deltas (complete pairs only)."""
    rows = []
    for depth in depths:
        deltas = {x_key: [] for x_key, _ in AXES}
        flops, base_bpb = [], []
        for seed in seeds:
            dirs = [run_dir(out_dir, RunSpec(arm, depth, seed)) for arm in (baseline, change)]
            if any(final_val_bpb(d) is None for d in dirs):
                continue
            runs = [load_run(d) for d in dirs]
            runs[0].label, runs[1].label = "baseline", "change"
            for x_key, _ in AXES:
                v = compare_axis(runs, x_key)
                deltas[x_key].append(v["bpb"]["change"] - v["bpb"]["baseline"] if v["best"] else None)
            flops.append(runs[0].info["hyperparameters"]["training_flops"])
            base_bpb.append(final_val_bpb(dirs[0]))
        if not flops:
            continue
        rows.append({"depth": depth, "flops": float(np.mean(flops)), "baseline_bpb": float(np.mean(base_bpb)),
                     "deltas": deltas, "stats": {k: stats.paired_stats(v) for k, v in deltas.items()}})
    return rows


def format_stat(s):
    if s["mean"] is None:
        return "-"
    text = f"{s['mean']:+.4f}"
    if s["se"] is not None:
        text += f" ± {s['se']:.4f} (t {s['t']:+.1f})"
    return text


def trend_for(rows, x_key, model):
    used = [r for r in rows if r["stats"][x_key]["mean"] is not None]
    return stats.fit_delta_trend([r["flops"] for r in used], [r["stats"][x_key]["mean"] for r in used],
                                 [r["depth"] for r in used], model)


def format_trend(trend, axis):
    if trend["b"] is None:
        return f"  Δ@{axis}: {trend['note']}"
    unit = "per decade of FLOPs" if trend["model"] == "log" else "x 1/FLOPs"
    b_se = "" if trend["b_se"] is None else f" ± {trend['b_se']:.2g}"
    text = f"  Δ@{axis}: Δ = {trend['a']:+.4g} {trend['b']:+.4g}{b_se} {unit}; "
    text += "|Δ| shrinks with compute" if trend["shrinking"] else ""
    if trend["zero_flops"] is not None:
        depth = "" if trend["zero_depth"] is None else f" (~d{trend['zero_depth']:.0f} on this ladder)"
        text += f"; predicted zero at {trend['zero_flops']:.3g} FLOPs{depth}"
    if trend["note"]:
        text += ("; " if trend["shrinking"] else "") + trend["note"]
    return text


def format_paired_report(change, baseline, rows, trends):
    axes = [name for name in ("step", "time", "flops")]
    lines = [f"{change.name} vs {baseline.name}: val bpb difference (change - baseline; negative = change better), "
             "paired by seed, mean ± standard error (t)",
             f"{'depth':>5} {'FLOPs':>9} {'seeds':>5} {'base bpb':>8}  " + "  ".join(f"{'Δ@' + a:<28}" for a in axes)]
    for r in rows:
        cells = "  ".join(f"{format_stat(r['stats'][x_key]):<28}" for x_key, _ in AXES)
        n = max(s["n"] for s in r["stats"].values())
        lines.append(f"{'d' + str(r['depth']):>5} {r['flops']:>9.3g} {n:>5} {r['baseline_bpb']:>8.4f}  {cells}")
    lines.append(f"trend across depths (least squares, {'log10 FLOPs' if trends[0]['model'] == 'log' else '1/FLOPs'}):")
    lines += [format_trend(t, a) for t, a in zip(trends, axes)]
    return "\n".join(lines)


def plot_paired(reports, out_path):
    """Left: Δ (mean ± SE) vs FLOPs per axis with the fitted trend; right: val bpb vs FLOPs per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_d, ax_b) = plt.subplots(1, 2, figsize=(14, 5.5))
    markers = {"step": "o", "total_training_time": "s", "total_training_flops": "^"}
    for ci, (change, baseline, rows, trends) in enumerate(reports):
        color = f"C{ci}"
        for (x_key, _), trend, style, nudge in zip(AXES, trends, ("-", ":", "--"), (0.92, 1.0, 1.08)):
            pts = [(r["flops"], r["stats"][x_key]) for r in rows if r["stats"][x_key]["mean"] is not None]
            if not pts:
                continue
            xs = np.array([p[0] for p in pts])
            # nudged sideways so the three axes' points stay visible
            ax_d.errorbar(xs * nudge, [p[1]["mean"] for p in pts], yerr=[p[1]["se"] or 0 for p in pts], color=color,
                          marker=markers[x_key], linestyle="none", capsize=3,
                          label=f"{change.name}: Δ@{x_key.removeprefix('total_training_')}")
            if trend["b"] is not None:
                hi = xs.max() * (min(trend["zero_flops"] / xs.max(), 30) if trend["zero_flops"] and trend["zero_flops"] > xs.max() else 1.5)
                grid = np.geomspace(xs.min() / 1.5, hi, 100)
                to_x = stats.TREND_MODELS[trend["model"]][0]
                ax_d.plot(grid, trend["a"] + trend["b"] * to_x(grid), color=color, linestyle=style, linewidth=1)
                if x_key == "total_training_flops" and trend["zero_flops"] and trend["zero_flops"] <= hi:
                    depth = "" if trend["zero_depth"] is None else f" (~d{trend['zero_depth']:.0f})"
                    ax_d.plot([trend["zero_flops"]], [0], marker="x", color=color, markersize=10)
                    ax_d.annotate(f"Δ@flops = 0 at {trend['zero_flops']:.2g}{depth}", (trend["zero_flops"], 0),
                                  fontsize=8, color=color, ha="right", textcoords="offset points", xytext=(-6, -12))
        for arm, dash in ((baseline, "-"), (change, "--")):
            if ci and arm is baseline:
                continue
            pts = arm_bpb_by_depth(rows, arm is baseline)
            ax_b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=dash,
                      color="k" if arm is baseline else color, label=arm.name)
    ax_d.axhline(0, color="gray", linewidth=1)
    style_log_axes(ax_d, "training FLOPs (per run)", "Δ val bpb (change - baseline)",
                   "paired Δ vs compute: mean ± SE over seeds; lines: least-squares trend")
    style_log_axes(ax_b, "training FLOPs (per run)", "final val bpb (mean over seeds)", "final val bpb per arm")
    save_figure(fig, out_path)


def style_log_axes(ax, xlabel, ylabel, title):
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def save_figure(fig, out_path):
    """Written to a temporary name and renamed: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = f"{out_path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)


def arm_bpb_by_depth(rows, is_baseline):
    """(FLOPs, mean final bpb) per depth; the change's final bpb is the baseline's plus the mean Δ at matched steps."""
    pts = []
    for r in rows:
        delta = 0.0 if is_baseline else (r["stats"]["step"]["mean"] or 0.0)
        pts.append((r["flops"], r["baseline_bpb"] + delta))
    return pts


# -----------------------------------------------------------------------------
# report: scaling law

def scaling_points(out_dir, baseline, depths, seeds, ratios):
    """Per (depth, ratio) with a finished run: params, tokens, FLOPs, mean final val bpb over seeds."""
    points = []
    for depth in depths:
        for ratio in ratios:
            found = []
            for seed in seeds:
                d = run_dir(out_dir, RunSpec(baseline, depth, seed, ratio))
                bpb = final_val_bpb(d)
                if bpb is not None:
                    found.append((load_run(d).info["hyperparameters"], bpb))
            if found:
                hp = found[0][0]
                points.append({"depth": depth, "ratio": ratio, "params": hp["params_scaling"],
                               "tokens": hp["training_tokens"], "flops": hp["training_flops"],
                               "bpb": float(np.mean([b for _, b in found])), "seeds": len(found)})
    return points


def format_scaling_report(points, fit):
    lines = ["scaling law: final val bpb per run (mean over seeds)",
             f"{'depth':>5} {'ratio':>6} {'params':>10} {'tokens':>10} {'FLOPs':>9} {'bpb':>8}"]
    lines += [f"{'d' + str(p['depth']):>5} {p['ratio']:>6g} {p['params']:>10.3g} {p['tokens']:>10.3g} {p['flops']:>9.3g} "
              f"{p['bpb']:>8.4f}" for p in points]
    if fit is None:
        return "\n".join(lines + ["(too few finished runs for a fit: need 6+)"])
    k, gamma = stats.frontier_power_law(fit)
    lines.append(f"fit: bpb = {fit['E']:.4f} + {fit['A']:.4g}/N^{fit['alpha']:.3f} + {fit['B']:.4g}/D^{fit['beta']:.3f} "
                 f"(rms residual {fit['rms']:.4f}; N = Kaplan-style params, D = tokens, C = 6ND)")
    lines.append(f"loss vs FLOPs on the compute-optimal frontier: bpb = {fit['E']:.4f} + {k:.4g} * C^-{gamma:.4f}")
    c_max = max(p["flops"] for p in points)
    for c in (min(p["flops"] for p in points), c_max, 100 * c_max):
        opt = stats.compute_optimal(fit, c)
        lines.append(f"compute-optimal at {c:.3g} FLOPs: N {opt['params']:.3g}, D {opt['tokens']:.3g}, "
                     f"tokens:params {opt['ratio']:.2f}, bpb {opt['loss']:.4f}")
    lines.append("compare: " + ", ".join(f"{k} {v:g}" for k, v in REFERENCE_RATIOS.items()))
    return "\n".join(lines)


def plot_scaling(points, fit, out_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, depth in enumerate(sorted({p["depth"] for p in points})):
        pts = sorted((p["flops"], p["bpb"], p["ratio"]) for p in points if p["depth"] == depth)
        ax_l.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"d{depth}")
        for c, b, r in pts:
            ax_l.annotate(f"{r:g}", (c, b), fontsize=7, textcoords="offset points", xytext=(3, 3))
    cs = np.geomspace(min(p["flops"] for p in points), 10 * max(p["flops"] for p in points), 100)
    if fit is not None:
        k, gamma = stats.frontier_power_law(fit)
        ax_l.plot(cs, fit["E"] + k * cs ** -gamma, "k--", label=f"compute-optimal frontier: E + K C^-{gamma:.3f}")
        ax_r.plot(cs, [stats.compute_optimal(fit, c)["ratio"] for c in cs], "k-", label="fitted compute-optimal ratio")
    for (name, ratio), style in zip(REFERENCE_RATIOS.items(), (":", "-.", "--")):
        ax_r.axhline(ratio, color="gray", linestyle=style, label=f"{name}: {ratio:g}")
    style_log_axes(ax_l, "training FLOPs", "final val bpb", "val bpb vs FLOPs (labels: tokens:params ratio)")
    style_log_axes(ax_r, "training FLOPs", "tokens per parameter", "compute-optimal tokens:params ratio")
    save_figure(fig, out_path)


def report(args, baseline, changes, out_dir):
    """Prints the tables, writes report.txt and sweep.png; returns the report text."""
    png = os.path.join(out_dir, "sweep.png")
    if args.scaling_law:
        points = scaling_points(out_dir, baseline, args.depths, args.seeds, args.ratios)
        try:
            fit = stats.fit_loss_surface([p["params"] for p in points], [p["tokens"] for p in points],
                                         [p["bpb"] for p in points])
        except ValueError as e:
            print(f"no scaling-law fit: {e}")
            fit = None
        text = format_scaling_report(points, fit)
        if points:
            plot_scaling(points, fit, png)
    else:
        reports, parts = [], []
        for change in changes:
            rows = paired_table(out_dir, baseline, change, args.depths, args.seeds)
            trends = [trend_for(rows, x_key, args.trend) for x_key, _ in AXES]
            reports.append((change, baseline, rows, trends))
            parts.append(format_paired_report(change, baseline, rows, trends))
        text = "\n\n".join(parts)
        if any(rows for _, _, rows, _ in reports):
            plot_paired(reports, png)
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nwrote {os.path.join(out_dir, 'report.txt')}" + (f" and {png}" if os.path.exists(png) else ""))
    return text


# -----------------------------------------------------------------------------

def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text):
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    base_flags = []
    if "--" in argv:
        i = argv.index("--")
        argv, base_flags = argv[:i], argv[i + 1:]
    p = ArgumentParser(description="Baseline vs changes over a depth ladder and seeds (paired), or a scaling-law ladder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="base_train flags shared by every run go after `--`.")
    p.add_argument("--out", required=True, help="sweep directory (runs/, commands.log, report.txt, sweep.png)")
    p.add_argument("--depths", type=int_list, default=[2, 4, 6], help="depth ladder, e.g. 2,4,6 on CPU or 12,20,24 on GPU")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N per (arm, depth); each sets --seed and --data-seed")
    p.add_argument("--first-seed", type=int, default=1,
                   help="run seeds K..N only: add seeds to a sweep whose earlier runs were kept elsewhere")
    p.add_argument("--baseline", default="baseline:", help="'NAME: KEY=VALUE --flag value ...' (default: no changes)")
    p.add_argument("--change", action="append", default=[], help="a change, same form as --baseline; repeat for several (default: none)")
    p.add_argument("--scaling-law", action="store_true", help="train the baseline at each of --ratios and fit the scaling law")
    p.add_argument("--ratios", type=float_list, default=[2, 4, 8, 16], help="tokens:params ratios for --scaling-law")
    p.add_argument("--trend", choices=sorted(stats.TREND_MODELS), default="log", help="Δ fitted against log10 FLOPs or 1/FLOPs")
    p.add_argument("--devices", default="", help="GPU ids for parallel runs, e.g. 0,1,2,3 (default: one run at a time)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="run each training run with torchrun on this many devices")
    p.add_argument("--wrap", default="", help="prefix for every run, e.g. 'flock /tmp/nanochat-bench.lock' (default: none)")
    p.add_argument("--flops-per-s", type=float, default=-1, help="FLOP/s per run for the time estimate (-1: measured)")
    p.add_argument("--assumed-mfu", type=float, default=0.4, help="MFU assumed when the estimate falls back to the device peak")
    p.add_argument("--overhead-s", type=float, default=20.0, help="per-run startup + compile seconds for the estimate")
    p.add_argument("--dry-run", action="store_true", help="print the commands and the estimate, run nothing")
    p.add_argument("--report-only", action="store_true", help="only report from the finished runs on disk")
    args = p.parse_args(argv)
    args.wrap = shlex.split(args.wrap)
    args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not 1 <= args.first_seed <= args.seeds or not args.depths or min(args.depths) < 1 or args.nproc_per_node < 1:
        p.error("--seeds, --depths and --nproc-per-node must be positive, and --first-seed from 1 to --seeds")
    if args.scaling_law and args.change:
        p.error("--scaling-law trains the baseline only: drop --change (or run two sweeps)")
    if not args.scaling_law and not args.change:
        p.error("give at least one --change (or --scaling-law)")
    if args.scaling_law and (not args.ratios or min(args.ratios) <= 0):
        p.error("--ratios must be positive numbers, e.g. 2,4,8,16")
    owned = [f for f in base_flags if f.split("=")[0] in SWEEP_OWNED_FLAGS + (("--target-param-data-ratio", "--num-iterations", "--target-flops") if args.scaling_law else ())]
    if owned:
        p.error(f"the shared base_train flags set {', '.join(owned)}: the sweep sets those per run")
    args.seeds = list(range(args.first_seed, args.seeds + 1))
    return args, base_flags


def main(argv=None):
    args, base_flags = parse_args(argv)
    baseline = parse_arm(args.baseline, "baseline")
    changes = [parse_arm(text, f"change{i + 1}") for i, text in enumerate(args.change)]
    names = [baseline.name] + [c.name for c in changes]
    if len(set(names)) != len(names):
        raise SweepError(f"arm names must differ, got {', '.join(names)}")
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    runs = plan_runs(baseline, changes, args.depths, args.seeds, args.ratios if args.scaling_law else None)
    if not args.report_only:
        status = {spec.name: run_status(run_dir(out_dir, spec), run_signature(spec, base_flags)) for spec in runs}
        todo = [spec for spec in runs if status[spec.name] == "todo"]
        done_dirs = [run_dir(out_dir, s) for s in runs if status[s.name] == "done"]
        print(f"{len(runs)} runs: {len(done_dirs)} already complete (skipped), {len(todo)} to run")
        for spec in runs:
            if status[spec.name] == "done":
                print(f"  skip (complete) {spec.name}")
        if todo:
            from nanochat.tokenizer import TokenizerNotFound, get_tokenizer
            try:  # the runs' vocab, for the FLOPs estimate; without a tokenizer every run would fail the same way
                vocab = get_tokenizer(_flag_value(base_flags, "--tokenizer-dir")).vocab_size
            except TokenizerNotFound as e:
                raise SweepError(f"{e} (or pass the runs' --tokenizer-dir after --)") from None
            rate, source = flops_rate(args, done_dirs)
            parallel = len(device_slots(args.devices, args.nproc_per_node))
            total_s, _ = estimate_seconds(todo, base_flags, args, vocab, rate, parallel)
            print(f"estimate: {total_s / 60:.1f} min for {len(todo)} runs at {rate:.3g} FLOP/s per run ({source}), "
                  f"{args.overhead_s:g} s overhead per run, {parallel} in parallel")
            if args.dry_run:
                slots = device_slots(args.devices, args.nproc_per_node)
                for i, spec in enumerate(todo):
                    env = {**slots[i % len(slots)], **spec.arm.env}  # the slot it would get if runs took equal time
                    print(format_command(launch_command(spec, base_flags, out_dir, args.wrap, args.nproc_per_node), env))
                return None
            t0 = time.time()
            failed = execute(todo, base_flags, args, out_dir)
            print(f"ran {len(todo) - len(failed)}/{len(todo)} runs in {(time.time() - t0) / 60:.1f} min")
            if failed:
                report(args, baseline, changes, out_dir)
                raise SweepError(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix the cause (see their train.log) "
                                 "and rerun the same command (finished runs are skipped)")
    return report(args, baseline, changes, out_dir)


def _flag_value(flags, name):
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith(name + "="):
            return flag.split("=", 1)[1]
    return None


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops the runs in flight too
    try:
        main()
    except SweepError as e:
        raise SystemExit(f"sweep: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("sweep: interrupted; rerun the same command to resume (finished runs are skipped)") from None
