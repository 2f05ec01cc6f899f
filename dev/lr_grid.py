"""The small-batch LR grid behind scaling.lr_batch_scale (issue 26): LR multiplier x total batch x depth x seed,
and the warmup grid behind scaling.default_warmup_steps (x warmup).

    python dev/lr_grid.py run    --out DIR [--batches 11,13,15] [--mults 1,4,16,64] [--depths 4,6] [--seeds 3] \
                                 [--first-seed 1] [--warmups 0,40,10%] -- FLAGS
    python dev/lr_grid.py report --out DIR [--results CSV] [...]  # table (mean ± s.e. over seeds), grid.png, the fit
    python dev/lr_grid.py save   --out DIR --results dev/lr_grid_runs.csv       # keep the finished runs' figures

Each batch size is one `scripts.sweep` (runs in DIR/b<log2 B>/): one arm per LR multiplier, every LR flag
(matrix, embedding, unembedding, scalar, gate) times the multiplier; all runs at a batch see the same number
of tokens (--tokens, so B = 2^15 gets 16x fewer steps than 2^11), paired by seed (init and data order).
A multiplier is relative to the sqrt(B / 2^19) rule at every batch, whatever rule scaling.lr_batch_scale holds
(the flags are divided by it), so grids run before and after the floor read on one axis.

The fit: at each (B, depth) the best multiplier k* is the vertex of a parabola through the mean final val bpb
against log2(k) at the best grid point and its two neighbours (the grid point itself at an edge). The rule
s(B) = (B / 2^19)^alpha below 2^19 (exactly sqrt above) makes k* = (2^19 / B)^(1/2 - alpha) against the sqrt
rule; alpha is the least-squares fit of log2 k* over all (B, depth).

--warmups crosses every multiplier with LR warmups: N steps, or P% of the run's steps (rounded, so the same
fraction at every batch). Warmup 0 is the plain multiplier arm (lr<k>, no --warmup-steps flag; the one the LR
grid runs), and the baseline its warmups are paired with by seed (arm lr<k>_w<N> or lr<k>_w<P>pct).

A grid outlives its machine only through `save`: run dirs live in /tmp and a fresh dev box starts empty, so the
final val bpb of every finished run goes into a committed CSV (one row per batch, arm, depth, seed and run length,
with the CPU it ran on), and `report --results` reads it for every run the run dirs no longer hold. `run
--first-seed K` adds seeds K..N to such a grid without rerunning the seeds only the CSV (or another box) holds.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import subprocess
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from nanochat import scaling  # noqa: E402
from scripts.sweep import final_val_bpb  # noqa: E402

DEFAULT_LRS = {"--matrix-lr": 0.02, "--embedding-lr": 0.3, "--unembedding-lr": 0.008, "--scalar-lr": 0.5,
               "--gate-lr": 0.2}  # base_train's defaults at B = 2^19


def lr_flags(mult, batch_tokens):
    """Every LR flag at mult x what the sqrt rule gives at this batch, given the code's own batch scale."""
    mult = mult * math.sqrt(batch_tokens / 2**19) / scaling.lr_batch_scale(batch_tokens)
    return " ".join(f"{flag} {value * mult:g}" for flag, value in DEFAULT_LRS.items())


def batch_dir(out, log2_batch):
    return os.path.join(out, f"b{log2_batch}")


def sweep(out, log2_batch, arms, args, flags):
    """One scripts.sweep at batch 2^log2_batch, arms = [(name, flag string)], first = baseline."""
    steps = args.tokens // 2**log2_batch
    (base_name, base_flags), *changes = arms
    argv = [sys.executable, "-m", "scripts.sweep", "--out", out, "--depths", ",".join(map(str, args.depths)),
            "--seeds", str(args.seeds), "--first-seed", str(args.first_seed), "--baseline", f"{base_name}: {base_flags}"]
    for name, change in changes:
        argv += ["--change", f"{name}: {change}"]
    if args.devices:
        argv += ["--devices", args.devices]
    argv += ["--", "--total-batch-size", str(2**log2_batch), "--num-iterations", str(steps),
             "--eval-every", str(steps), *flags, *fitting_device_batch(2**log2_batch, flags)]
    print(" ".join(argv[1:]), flush=True)
    subprocess.run(argv, cwd=REPO_ROOT, check=False)


def fitting_device_batch(batch_tokens, flags):
    """[] if the shared --device-batch-size fits in one step of batch_tokens, else the largest that does."""
    def value(name, default):
        return int(flags[flags.index(name) + 1]) if name in flags else default
    seq_len, device_batch = value("--max-seq-len", 2048), value("--device-batch-size", 32)
    return [] if device_batch * seq_len <= batch_tokens else ["--device-batch-size", str(batch_tokens // seq_len)]


def mult_name(mult):
    return f"lr{mult:g}"


def arm_name(mult, warmup):
    """lr<k> for warmup "0" (the LR grid's own arm), lr<k>_w<N> or lr<k>_w<P>pct otherwise."""
    return mult_name(mult) + ("" if warmup == "0" else "_w" + warmup.replace("%", "pct"))


def warmup_steps(warmup, steps):
    """"N" -> N steps; "P%" -> P% of the run's steps, rounded."""
    return round(float(warmup[:-1]) / 100 * steps) if warmup.endswith("%") else int(warmup)


def run_grid(args, flags):
    for b in args.batches:
        steps = args.tokens // 2**b
        arms = [(arm_name(m, w), lr_flags(m, 2**b) + ("" if w == "0" else f" --warmup-steps {warmup_steps(w, steps)}"))
                for m in args.mults for w in args.warmups]
        sweep(batch_dir(args.out, b), b, arms, args, flags)


def by_seed(args, log2_batch, arm, depth):
    """{seed: final val bpb} of one arm at one depth, complete runs only: the run dir, else the --results CSV."""
    vals = {}
    for s in range(1, args.seeds + 1):
        bpb = final_val_bpb(os.path.join(batch_dir(args.out, log2_batch), "runs", arm, f"d{depth}_s{s}"))
        vals[s] = bpb if bpb is not None else args.saved.get((log2_batch, arm, depth, s, args.tokens), (None,))[0]
    return {s: v for s, v in vals.items() if v is not None}


RESULT_FIELDS = ["log2_batch", "arm", "depth", "seed", "tokens", "final_val_bpb", "cpu"]


def load_results(path):
    """{(log2_batch, arm, depth, seed, tokens): (final val bpb, cpu)} from a `save` CSV ({} without one)."""
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, newline="") as f:
            return {(int(r["log2_batch"]), r["arm"], int(r["depth"]), int(r["seed"]), int(r["tokens"])):
                    (float(r["final_val_bpb"]), r["cpu"]) for r in csv.DictReader(f)}
    except (KeyError, ValueError, TypeError) as e:
        sys.exit(f"{path}: not a results CSV from `lr_grid.py save` ({e!r}); fix or remove it")


def cpu_name():
    """'<model name> (family F model M)' from /proc/cpuinfo: AMD Zen 3 and Zen 4 share the model name."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return "unknown"
    info = {k.strip(): v.strip() for k, v in info.items()}
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"


def save(args):
    """Merge every finished run under --out (all batches) into the --results CSV; a run already there is kept
    as first saved (its figure and the CPU it ran on)."""
    rows, cpu = dict(args.saved), cpu_name()
    added = 0
    for b in args.batches:
        for directory in sorted(glob.glob(os.path.join(batch_dir(args.out, b), "runs", "*", "d*_s*"))):
            arm, run = directory.split(os.sep)[-2:]
            match, bpb = re.fullmatch(r"d(\d+)_s(\d+)", run), final_val_bpb(directory)
            if match is None or bpb is None:
                continue
            with open(os.path.join(directory, "run.json")) as f:
                tokens = json.load(f)["hyperparameters"]["training_tokens"]
            key = (b, arm, int(match[1]), int(match[2]), tokens)
            if key not in rows:
                rows[key], added = (bpb, cpu), added + 1
    with open(args.results, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(RESULT_FIELDS)
        for key in sorted(rows):
            w.writerow([*key, f"{rows[key][0]:.6f}", rows[key][1]])
    print(f"{args.results}: {added} runs added, {len(rows)} in all")


def mean_se(values):
    """(mean, standard error); the error is 0 for a single value."""
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def best_mult(mults, means):
    """Parabola vertex in log2(mult) through the best point and its neighbours (the point itself at an edge)."""
    x = np.log2(mults)
    i = int(np.argmin(means))
    if i in (0, len(x) - 1):
        return mults[i], True
    a, b, _ = np.polyfit(x[i - 1:i + 2], means[i - 1:i + 2], 2)
    return 2 ** float(np.clip(-b / (2 * a), x[i - 1], x[i + 1])), False


def bpb_at(mults, means, k):
    """Mean bpb at multiplier k, from the parabola in log2(k) through the three grid points nearest to it."""
    x = np.log2(mults)
    idx = np.argsort(np.abs(x - math.log2(k)))[:3]
    coeffs = np.polyfit(x[idx], means[idx], 2)
    return float(np.polyval(coeffs, math.log2(k)))


def report(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| depth | batch | " + " | ".join(f"LR x{m:g}" for m in args.mults) + " | best multiplier k* |",
             "|---|---|" + "---|" * len(args.mults) + "---|"]
    fit_x, fit_y, curves = [], [], []
    rows = 2 if len(args.warmups) > 1 else 1
    fig, axes = plt.subplots(rows, len(args.depths), figsize=(5.5 * len(args.depths), 4 * rows), squeeze=False)
    for j, d in enumerate(args.depths):
        ax = axes[0][j]
        for b in args.batches:
            stats = []
            for m in args.mults:
                vals = list(by_seed(args, b, mult_name(m), d).values())
                stats.append((*mean_se(vals), len(vals)) if vals else None)
            done = [(m, s) for m, s in zip(args.mults, stats) if s]
            if len(done) < 3:
                continue
            ms, means = np.array([m for m, _ in done]), np.array([s[0] for _, s in done])
            k, at_edge = best_mult(ms, means)
            cells = [f"{s[0]:.4f} ± {s[1]:.4f}" + (f" (n={s[2]})" if s[2] != args.seeds else "") if s else "—"
                     for s in stats]
            lines.append(f"| d{d} | 2^{b} | " + " | ".join(cells) + f" | {k:.1f}" + (" (grid edge)" if at_edge else "") + " |")
            curves.append((d, b, ms, means, k))
            if not at_edge:
                fit_x.append(math.log2(2**19 / 2**b))
                fit_y.append(math.log2(k))
            ax.errorbar(ms, means, yerr=[s[1] for _, s in done], marker="o", capsize=3, label=f"B = 2^{b}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LR multiplier (x the sqrt(B/2^19) rule)")
        ax.set_ylabel("final val bpb (mean ± s.e. over seeds)")
        ax.set_title(f"d{d}, {args.tokens / 2**20:g} Mi tokens per run")
        ax.grid(True, alpha=0.3)
        ax.legend()
    text = "\n".join(lines)
    if fit_x:
        # log2 k* = (1/2 - alpha) * log2(2^19 / B), least squares through the origin (k* = 1 at 2^19)
        x, y = np.array(fit_x), np.array(fit_y)
        slope = float(x @ y / (x @ x))
        resid = y - slope * x
        se = math.sqrt(float(resid @ resid) / max(1, len(x) - 1) / float(x @ x))
        text += (f"\n\nfit over {len(x)} interior optima: log2 k* = {slope:.3f} ± {se:.3f} x log2(2^19 / B)"
                 f"  ->  LR scale (B / 2^19)^alpha with alpha = {0.5 - slope:.3f} ± {se:.3f} (sqrt rule: 0.5)")
        alphas = {"sqrt (0.5)": 0.5, "floor (0)": 0.0, f"fit ({0.5 - slope:.2f})": 0.5 - slope}
        text += "\n\nval bpb above the cell's best (parabola through the three nearest grid points) under each rule:\n"
        text += "| depth | batch | " + " | ".join(alphas) + " |\n|---|---|" + "---|" * len(alphas)
        for d, b, ms, means, k in curves:
            best = bpb_at(ms, means, k)
            cells = [f"{bpb_at(ms, means, 2.0 ** ((0.5 - a) * (19 - b))) - best:+.4f}" for a in alphas.values()]
            text += f"\n| d{d} | 2^{b} | " + " | ".join(cells) + " |"
    if rows == 2:
        text += "\n\n" + warmup_report(args, axes[1])
    png = os.path.join(args.out, "grid.png")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(text)
    with open(os.path.join(args.out, "grid.txt"), "w") as f:
        f.write(text + "\n")
    print(f"wrote {png} and {os.path.join(args.out, 'grid.txt')}")


def warmup_report(args, axes):
    """Per (depth, batch, multiplier): final val bpb at each warmup, and each warmup minus warmup 0 paired by
    seed (mean ± s.e.); the paired differences plotted per depth."""
    warmups = [w for w in args.warmups if w != "0"]
    lines = ["warmup grid: final val bpb (mean ± s.e.), then each warmup minus none, paired by seed:",
             "| depth | batch | steps | LR x | none | " + " | ".join(f"warmup {w}" for w in warmups) + " | "
             + " | ".join(f"{w} − none" for w in warmups) + " |",
             "|---|---|---|---|---|" + "---|" * (2 * len(warmups))]
    for ax, d in zip(axes, args.depths):
        for b in args.batches:
            steps = args.tokens // 2**b
            for m in args.mults:
                base = by_seed(args, b, arm_name(m, "0"), d)
                arms = [by_seed(args, b, arm_name(m, w), d) for w in warmups]
                if not base or not any(arms):
                    continue
                cells, deltas, points = [], [], []
                for w, vals in zip(warmups, arms):
                    cells.append("%.4f ± %.4f (n=%d)" % (*mean_se(list(vals.values())), len(vals)) if vals else "—")
                    paired = [vals[s] - base[s] for s in vals if s in base]
                    deltas.append("%+.4f ± %.4f (n=%d)" % (*mean_se(paired), len(paired)) if paired else "—")
                    if paired:
                        points.append((warmup_steps(w, steps), *mean_se(paired)))
                lines.append(f"| d{d} | 2^{b} | {steps} | {m:g} | %.4f ± %.4f (n=%d) | " % (*mean_se(list(base.values())), len(base))
                             + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
                if points:
                    xs, ys, es = zip(*sorted([(0, 0.0, 0.0), *points]))
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"B = 2^{b} ({steps} steps), LR x{m:g}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("symlog", base=2, linthresh=1)
        ax.set_xlim(-0.2, 64)
        ax.set_xlabel(f"warmup steps ({', '.join(warmups)} of the run)")
        ax.set_ylabel("Δ final val bpb vs no warmup (paired by seed)")
        ax.set_title(f"d{d}: LR warmup against none")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return "\n".join(lines)


def main():
    argv = sys.argv[1:]
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["run", "report", "save"])
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[11, 13, 15],
                   help="log2 of the total batch sizes")
    p.add_argument("--mults", type=lambda s: [float(x) for x in s.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[4, 6])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=1, help="run: seeds --first-seed..--seeds only (report: all)")
    p.add_argument("--tokens", type=int, default=2**20, help="training tokens of every run")
    p.add_argument("--warmups", type=lambda s: [x.strip() for x in s.split(",")], default=["0"],
                   help="LR warmups crossed with every multiplier: steps (40) or a percent of the run (10%%)")
    p.add_argument("--results", default="", help="CSV of finished runs (save writes it, report reads it where a run dir is gone)")
    p.add_argument("--devices", default="0,1", help="parallel slots (scripts.sweep --devices; on CPU: 2 runs at a time)")
    args = p.parse_args(argv)
    args.saved = load_results(args.results)
    if args.mode == "report":
        report(args)
    elif args.mode == "save":
        if not args.results:
            p.error("save needs --results CSV (e.g. dev/lr_grid_runs.csv)")
        save(args)
    else:
        run_grid(args, flags)


if __name__ == "__main__":
    main()
