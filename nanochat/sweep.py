"""Sweep statistics: paired seed differences, how a gain moves with compute, and the scaling-law fit.

Pure numbers in, numbers out (numpy only): scripts/sweep.py runs the training runs, reads their
logs and calls these. The method is the notes' one: an idea is judged by the difference
change - baseline of runs that share a seed (same init and the same data order), repeated over
seeds so the spread between runs is measured rather than guessed, and over a depth ladder,
because gains shrink (and flip) with scale.

- `paired_stats`: mean, standard error and t of per-seed differences.
- `fit_delta_trend`: least squares of the mean difference against log10(FLOPs) (or 1/FLOPs),
  and the FLOPs (and depth) where the fitted line predicts the difference reaches zero.
- `fit_loss_surface`: L(N, D) = E + A/N^alpha + B/D^beta over runs at several tokens:params
  ratios (Chinchilla's parametric form), from which the compute-optimal ratio and the
  loss-vs-FLOPs power law along the compute-optimal frontier follow in closed form.
"""

import math

import numpy as np

# the trend models: x as a function of FLOPs; the difference is fitted as a + b * x
TREND_MODELS = {
    "log": (lambda c: np.log10(c), lambda x: 10.0 ** x),   # delta linear in log10(FLOPs)
    "inverse": (lambda c: 1.0 / c, lambda x: 1.0 / x),     # delta = a + b / FLOPs: a gain ~1/FLOPs over a fixed cost
}


def paired_stats(deltas):
    """{n, mean, se, t} of per-seed differences; se/t are None below 2 seeds, t is inf when se is 0."""
    d = np.asarray([x for x in deltas if x is not None and math.isfinite(x)], dtype=float)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "se": None, "t": None}
    mean = float(d.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "se": None, "t": None}
    se = float(d.std(ddof=1) / math.sqrt(n))
    t = mean / se if se > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
    return {"n": n, "mean": mean, "se": se, "t": t}


def depth_for_flops(depths, flops, target_flops):
    """The depth at which the ladder's FLOPs would reach `target_flops`: log-log line through the ladder."""
    if len(depths) < 2 or target_flops is None:
        return None
    slope, intercept = np.polyfit(np.log(flops), np.log(depths), 1)
    return float(math.exp(intercept + slope * math.log(target_flops)))


def fit_delta_trend(flops, mean_deltas, depths=None, model="log"):
    """Least squares of the per-depth mean difference against x(FLOPs): delta = a + b * x.

    Returns a dict: model, a, b, b_se (None below 3 points), shrinking (the fitted |delta|
    falls with compute), zero_flops (where the line crosses zero, if it shrinks toward it
    beyond the ladder's largest FLOPs; None otherwise), zero_depth (that FLOPs mapped through
    the ladder's depth-FLOPs line), note. Unweighted: with 2-3 seeds a per-depth standard
    error is itself too noisy to weight by.
    """
    to_x, from_x = TREND_MODELS[model]
    c = np.asarray(flops, dtype=float)
    y = np.asarray(mean_deltas, dtype=float)
    out = {"model": model, "a": None, "b": None, "b_se": None, "shrinking": None, "zero_flops": None,
           "zero_depth": None, "note": ""}
    if len(c) < 2 or len(set(c.tolist())) < 2:
        out["note"] = "needs 2+ depths"
        return out
    x = to_x(c)
    X = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
    out.update(a=float(a), b=float(b))
    if len(c) > 2:
        residual = y - X @ np.array([a, b])
        s2 = float(residual @ residual) / (len(c) - 2)
        out["b_se"] = math.sqrt(s2 / float(((x - x.mean()) ** 2).sum()))
    # does |a + b x| fall as FLOPs grow? dx/dC is + for log, - for inverse
    direction = 1.0 if model == "log" else -1.0
    fitted_first = a + b * x[np.argmin(c)]  # at the ladder's smallest compute
    out["shrinking"] = bool(fitted_first * b * direction < 0)
    if b == 0 or not out["shrinking"]:
        out["note"] = "|Δ| does not shrink with compute: no zero crossing ahead"
        return out
    x0 = -a / b
    if model == "inverse" and x0 <= 0:
        out["note"] = "the line never crosses zero at positive FLOPs"
        return out
    zero = float(from_x(x0))
    if zero <= c.max():
        out["note"] = "the fitted line already crossed zero inside the ladder"
    out["zero_flops"] = zero
    if depths is not None:
        out["zero_depth"] = depth_for_flops(depths, c, zero)
    return out


# -----------------------------------------------------------------------------
# scaling law

def fit_loss_surface(params, tokens, losses, lo=0.05, hi=1.2):
    """Fits L = E + A / N^alpha + B / D^beta; returns {E, A, B, alpha, beta, rms}.

    Variable projection: for fixed (alpha, beta) the model is linear in (E, A, B), so those come
    from least squares; (alpha, beta) is searched on a coarse grid over [lo, hi], then on a fine
    grid around the best coarse pair. No optimiser to diverge, nothing beyond numpy. Needs at
    least 6 runs (5 unknowns + 1). A and B must come out positive (loss falls with N and D).
    """
    n = np.asarray(params, dtype=float)
    d = np.asarray(tokens, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(y) < 6:
        raise ValueError(f"a loss surface has 5 unknowns: give at least 6 runs (depths x ratios), got {len(y)}")
    # normalise so the columns are O(1) (keeps lstsq well conditioned at N ~ 1e9)
    n0, d0 = np.exp(np.log(n).mean()), np.exp(np.log(d).mean())

    def search(alphas, betas, best=None):
        for alpha in alphas:
            col_n = (n / n0) ** -alpha
            for beta in betas:
                X = np.stack([np.ones_like(y), col_n, (d / d0) ** -beta], axis=1)
                coef, *_ = np.linalg.lstsq(X, y, rcond=None)
                rss = float(((X @ coef - y) ** 2).sum())
                if coef[1] > 0 and coef[2] > 0 and (best is None or rss < best[0]):
                    best = (rss, alpha, beta, coef)
        return best

    step = 0.05
    best = search(np.arange(lo, hi + 1e-9, step), np.arange(lo, hi + 1e-9, step))
    if best is None:
        raise ValueError("no fit with positive A and B: the losses do not fall with both model size and data")
    fine = lambda center: np.clip(np.arange(center - step, center + step + 1e-9, step / 10), lo, hi)
    rss, alpha, beta, (e, a, b) = search(fine(best[1]), fine(best[2]), best)
    return {"E": float(e), "A": float(a * n0 ** alpha), "B": float(b * d0 ** beta), "alpha": float(alpha),
            "beta": float(beta), "rms": math.sqrt(rss / len(y))}


def compute_optimal(fit, flops):
    """Compute-optimal (params, tokens, tokens:params ratio, loss) at `flops`, with C = 6 N D.

    Minimising A/N^alpha + B/D^beta at fixed N*D = C/6 gives
    N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)).
    """
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
    n_opt = g * (flops / 6.0) ** (beta / (alpha + beta))
    d_opt = flops / 6.0 / n_opt
    loss = fit["E"] + fit["A"] / n_opt ** alpha + fit["B"] / d_opt ** beta
    return {"flops": float(flops), "params": float(n_opt), "tokens": float(d_opt), "ratio": float(d_opt / n_opt),
            "loss": float(loss)}


def frontier_power_law(fit):
    """Along the compute-optimal frontier L(C) = E + K * C^-gamma, gamma = alpha*beta/(alpha+beta): returns (K, gamma)."""
    gamma = fit["alpha"] * fit["beta"] / (fit["alpha"] + fit["beta"])
    at_one = compute_optimal(fit, 1.0)
    return at_one["loss"] - fit["E"], gamma
