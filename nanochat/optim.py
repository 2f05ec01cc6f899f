"""The optimizer: Muon for the block matrices, AdamW for embeddings, lm_head and scalars, in one class.

`MuonAdamW` owns the update rules, the gradient averaging across ranks and the optimizer state.
It does not own schedules: the training loop calls `update_hparams()` every step.

Muon (facts in shared NOTES.md, "Optimisation", and RECIPE.md, "Optimizer"), per group of
same-shape matrices stacked into one (k, rows, cols) tensor so one batched matmul chain serves them all:
  Nesterov momentum -> cast to the orthogonalisation dtype -> MuonEq (optional: rows to equal norm)
  -> 5 Polar Express iterations (~ the nearest semi-orthogonal U V^T)
  -> Muon+ (optional: Frobenius norm to sqrt(min(rows, cols)))
  -> NorMuon row/column normalisation (on by default: -0.016 val loss at d4 over 8 seeds, dev/LOG.md)
  -> p -= lr' * (update + wd * p * [update * p >= 0]),  lr' = lr * max(1, rows/cols)^0.5
     (cautious weight decay; the shape factor scales the decay too, as in the reference)
AdamW: bias-corrected Adam, math in fp32 whatever the parameter dtype, optionally the same
cautious decay (the GPT's groups use plain decoupled decay, RECIPE.md).

Orthogonalisation dtype: bf16 (NOTES), except fp32 when COMPUTE_DTYPE is fp32. fp32 is the
debugging mode (NANOCHAT_DTYPE=float32, "the whole run in fp32"), so it must not hide a bf16
rounding step; and bf16 is chaotic at the ulp level: a 1e-7 relative perturbation of a 256x256
gradient moves bf16 Polar Express outputs by up to 20% of their RMS (fp32: 1e-5), so runs that
differ only in summation order (1 vs 8 ranks) could never be compared in bf16.

Every hyperparameter a schedule touches (lr, weight_decay, momentum, betas, eps) lives in its
param group as a 0-D fp32 tensor on the parameters' device, filled in place; the compiled
update functions take them as tensor inputs, so a schedule that moves them every step causes
no recompiles. Python floats there would be baked into the graph as constants.

Distributed (world size > 1, no DDP wrapper): `step()` averages the gradients itself, ZeRO-2
style. Each Muon group is reduce-scattered along its stack so each rank receives the averaged
gradients of its own slice of matrices (the stack is zero-padded to a multiple of the world
size), orthogonalises only those, then all-gathers the new matrices. Each large AdamW tensor is
reduce-scattered along dim 0, each rank updates its rows with its rows' optimizer state, then
all-gathers. Small tensors are all-reduced and updated on every rank. All reductions are launched
before any update and waited one group at a time, and all gathers are waited at the very end, so
communication overlaps the update compute. Optimizer state is therefore sharded: state_dict() is
per rank and only loads into a run with the same world size and rank.
"""

import functools

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE

# Polar Express (Amsel et al. 2025, arXiv:2505.16932): per-iteration coefficients (a, b, c) of
# X <- a X + b (X X^T) X + c (X X^T)^2 X, optimised for 5 iterations, as used by the public
# modded-nanogpt / nanochat speedruns. The first iterations have large coefficients to pull
# small singular values up fast; the later ones settle them near 1.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# X is first divided by its Frobenius norm (>= its spectral norm) times this 1% safety margin,
# so every singular value starts in (0, 1], the interval the coefficients were fitted on
# (RECIPE R1: 1.01, was 1.02; the Frobenius norm already over-estimates the spectral norm).
POLAR_EXPRESS_SAFETY = 1.01
NORMUON_EPS = 1e-10  # floor of NorMuon's second moment before rsqrt (RECIPE)
# AdamW tensors with fewer elements are all-reduced instead of reduce-scattered + all-gathered:
# one latency-bound collective beats two, and sharding state this small saves nothing.
SHARD_MIN_NUMEL = 4096

# torch 2.13 renamed the two tensor collectives (the old names warn); torch >= 2.9 has the old ones.
# Both work on gloo (CPU, checked with torchrun on 2 ranks) and nccl, including ReduceOp.AVG and an
# in-place all-gather whose input is this rank's slice of the output.
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def default_orth_dtype(compute_dtype=COMPUTE_DTYPE):
    return torch.float32 if compute_dtype == torch.float32 else torch.bfloat16


# -----------------------------------------------------------------------------
# the update rules (pure tensor code: these are what torch.compile sees)

def polar_express(G, orth_dtype):
    """Approximately U V^T for each matrix U S V^T in G (..., rows, cols), computed in orth_dtype."""
    X = G.to(orth_dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_SAFETY + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def muon_eq(X):
    """MuonEq: rescale every row of X (..., rows, cols) to the same norm, ||X||_F / sqrt(rows).

    Applied to the momentum before orthogonalisation, so no single row (output neuron) with a
    large gradient dominates the spectrum Polar Express sees (RECIPE, 4e014d3). Math in fp32,
    result in X's dtype.
    """
    Xf = X.float()
    target = Xf.norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    return (Xf * (target / Xf.norm(dim=-1, keepdim=True).clamp_min(1e-12))).to(X.dtype)


def muon_plus(U):
    """Muon+: rescale the orthogonalised U (..., rows, cols) to Frobenius norm sqrt(min(rows, cols)),
    the norm of an exact semi-orthogonal matrix; removes Polar Express's few-% norm error (RECIPE, 4e014d3)."""
    return U * (min(U.size(-2), U.size(-1)) ** 0.5 / U.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12))


def normuon_normalize(U, second_moment, beta2):
    """NorMuon-style factored normalisation of an orthogonalised update U (k, rows, cols), fp32.

    Keeps an EMA of the mean square of each row (tall/square U) or column (wide U): the
    direction in which U's vectors are NOT unit length. Each row/column is divided by its RMS,
    then the whole matrix is rescaled back to U's Frobenius norm, so only the balance between
    neurons changes, never the overall step size.
    """
    reduce_dim = -1 if U.size(-2) >= U.size(-1) else -2
    second_moment.lerp_(U.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    V = U * second_moment.clamp_min(NORMUON_EPS).rsqrt()
    return V * (U.norm(dim=(-2, -1), keepdim=True) / V.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-20))


def decay_rate(update, p, weight_decay, cautious):
    """weight_decay, zeroed where the update and the parameter disagree in sign when cautious.

    p moves by -lr * update, so update * p > 0 means the step already shrinks |p|: decay joins
    it there, and never pushes a coordinate against a gradient that wants it to grow. `>=` (the
    reference since 6bb9240): a coordinate with a zero update, or p == 0, is decayed too.
    """
    return weight_decay * ((update * p) >= 0) if cautious else weight_decay


def muon_update(params, grads, momentum_buffer, second_moment, lr, weight_decay, momentum, beta2,
                lr_scale, orth_dtype, cautious, normuon, use_muon_eq=False, use_muon_plus=False):
    """One Muon step on a stack of same-shape matrices `params` (k, rows, cols), in place.

    Tensors: lr, weight_decay, momentum, beta2 (0-D). Constants: lr_scale (max(1, rows/cols)^0.5),
    orth_dtype, cautious, normuon (second_moment is unused when normuon is False), use_muon_eq,
    use_muon_plus.
    """
    momentum_buffer.lerp_(grads.float(), 1 - momentum)
    nesterov = grads.float().lerp(momentum_buffer, momentum)
    X = nesterov.to(orth_dtype)
    if use_muon_eq:
        X = muon_eq(X)
    U = polar_express(X, orth_dtype).float()
    if use_muon_plus:
        U = muon_plus(U)
    if normuon:
        U = normuon_normalize(U, second_moment, beta2)
    p = params.float()
    params.copy_(p - (lr * lr_scale) * (U + decay_rate(U, p, weight_decay, cautious) * p))


def adamw_update(param, grad, exp_avg, exp_avg_sq, step, lr, weight_decay, beta1, beta2, eps, cautious):
    """One bias-corrected AdamW step on `param` in place, math in fp32; all hyperparameters 0-D tensors."""
    step.add_(1)
    g = grad.float()
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * g * g)
    step_size = lr / (1 - beta1 ** step)
    denom = exp_avg_sq.sqrt() / (1 - beta2 ** step).sqrt() + eps
    update = exp_avg / denom
    p = param.float()
    # decay first, then the Adam step, with the same rounding order as torch.optim.AdamW
    p = p * (1 - lr * decay_rate(update, p, weight_decay, cautious))
    param.copy_(p - step_size * update)


@functools.cache
def compiled_update(update_fn):
    """update_fn through torch.compile, one per process so every optimizer shares its graphs. Made on first use:
    torch.compile imports torch._dynamo, ~1.9 s of every eager process's start-up on a 2-core CPU (dev/LOG.md,
    2026-12-03). dynamic=False: one graph per shape (a model has a handful), no symbolic-shape guards to trip on."""
    return torch.compile(update_fn, dynamic=False, fullgraph=True)


# -----------------------------------------------------------------------------

class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW with cautious weight decay and in-optimizer gradient averaging across ranks.

    param_groups: dicts with "kind" ("muon" | "adamw"), "params", "lr", and optionally
      both:  weight_decay (0.0), cautious (True)
      muon:  momentum (0.95), normuon (True), beta2 (0.9, NorMuon's EMA; RECIPE R1, was 0.95),
             muon_eq (False), muon_plus (False); all params one 2-D shape
      adamw: betas ((0.8, 0.95)), eps (1e-10)
    compiled: run the per-group update functions through torch.compile.
    orth_dtype: dtype of the Polar Express iterations (default: see the module docstring).
    """

    def __init__(self, param_groups, compiled=True, orth_dtype=None):
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.orth_dtype = orth_dtype or default_orth_dtype()
        self._muon_update = compiled_update(muon_update) if compiled else muon_update
        self._adamw_update = compiled_update(adamw_update) if compiled else adamw_update
        super().__init__(param_groups, defaults={})

    def add_param_group(self, group):
        params = list(group["params"])
        if not params:
            raise ValueError("a MuonAdamW param group needs at least one parameter")
        kind = group.get("kind")
        if kind not in ("muon", "adamw"):
            raise ValueError(f"param group 'kind' must be 'muon' or 'adamw', got {kind!r}")
        device = params[0].device

        def as_tensor(x):
            return torch.tensor(float(x), dtype=torch.float32, device=device)
        lr, weight_decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
        group.update(params=params, lr=as_tensor(lr), initial_lr=lr, weight_decay=as_tensor(weight_decay),
                     initial_weight_decay=weight_decay, cautious=bool(group.get("cautious", True)))
        if kind == "muon":
            shapes = {tuple(p.shape) for p in params}
            if len(shapes) != 1 or len(params[0].shape) != 2:
                raise ValueError(f"a muon group holds 2-D matrices of one shape (they are stacked), got "
                                 f"shapes {sorted(shapes)}: make one group per shape")
            group.update(momentum=as_tensor(group.get("momentum", 0.95)), beta2=as_tensor(group.get("beta2", 0.9)),
                         normuon=bool(group.get("normuon", True)), muon_eq=bool(group.get("muon_eq", False)),
                         muon_plus=bool(group.get("muon_plus", False)))
        else:
            beta1, beta2 = group.pop("betas", (0.8, 0.95))
            group.update(beta1=as_tensor(group.get("beta1", beta1)), beta2=as_tensor(group.get("beta2", beta2)),
                         eps=as_tensor(group.get("eps", 1e-10)))
        super().add_param_group(group)
        self._init_state(group)

    # -- sharding: which part of each tensor this rank updates ------------------------

    def _muon_chunk(self, group):
        """Matrices per rank: the stack is zero-padded to world_size * chunk; rank r owns [r*chunk, (r+1)*chunk)."""
        return -(-len(group["params"]) // self.world_size)

    def _adamw_rows(self, p):
        """(start, end) rows of p this rank updates (reduce-scattered), or None (all-reduced, all rows)."""
        W = self.world_size
        if W == 1 or p.numel() < SHARD_MIN_NUMEL or p.dim() == 0 or p.shape[0] % W:
            return None
        rows = p.shape[0] // W
        return self.rank * rows, (self.rank + 1) * rows

    def _init_state(self, group):
        """State is allocated up front (not on the first step) so load_state_dict can copy into it."""
        params = group["params"]
        fp32 = dict(dtype=torch.float32, device=params[0].device)
        if group["kind"] == "muon":
            rows, cols = params[0].shape
            stack = (self._muon_chunk(group), rows, cols)
            # one stacked state per group, stored under the group's first parameter
            self.state[params[0]] = {
                "momentum_buffer": torch.zeros(stack, **fp32),
                "second_moment": torch.zeros(stack[0], rows, 1, **fp32) if rows >= cols
                else torch.zeros(stack[0], 1, cols, **fp32),
            }
            return
        for p in params:
            span = self._adamw_rows(p)
            shape = p.shape if span is None else (span[1] - span[0], *p.shape[1:])
            self.state[p] = {"step": torch.zeros((), **fp32), "exp_avg": torch.zeros(shape, **fp32),
                             "exp_avg_sq": torch.zeros(shape, **fp32)}

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self):
        """Averages gradients across ranks (if distributed) and updates every parameter."""
        reductions = [self._launch_reductions(group) for group in self.param_groups]
        finishers = [self._update_group(group, reduced) for group, reduced in zip(self.param_groups, reductions)]
        for finish in finishers:
            finish()

    def _launch_reductions(self, group):
        """Starts the gradient averaging of one group; returns [(averaged-grad buffer, work or None)]."""
        W, avg = self.world_size, dist.ReduceOp.AVG
        # a parameter without a gradient steps with a zero one, so every rank runs the same collectives
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group["params"]]
        if group["kind"] == "muon":
            pad = self._muon_chunk(group) * W - len(grads)
            stacked = torch.stack(grads + [torch.zeros_like(grads[0])] * pad)
            if W == 1:
                return [(stacked, None)]
            mine = stacked.new_empty(stacked.shape[0] // W, *stacked.shape[1:])
            return [(mine, reduce_scatter_single(mine, stacked, op=avg, async_op=True))]
        out = []
        for p, g in zip(group["params"], grads):
            if W == 1:
                out.append((g, None))
            elif self._adamw_rows(p) is None:
                g = g.clone()  # all_reduce is in place; leave .grad as the backward left it
                out.append((g, dist.all_reduce(g, op=avg, async_op=True)))
            else:
                mine = g.new_empty(g.shape[0] // W, *g.shape[1:])
                out.append((mine, reduce_scatter_single(mine, g, op=avg, async_op=True)))
        return out

    def _update_group(self, group, reduced):
        """Waits for one group's averaged gradients, updates this rank's part, starts the all-gathers.

        Returns a function that waits for the gathers and leaves every parameter complete.
        """
        update = self._update_muon if group["kind"] == "muon" else self._update_adamw
        return update(group, reduced)

    def _update_muon(self, group, reduced):
        (grads, work), = reduced
        params, state = group["params"], self.state[group["params"][0]]
        chunk, W = self._muon_chunk(group), self.world_size
        mine = params[self.rank * chunk:(self.rank + 1) * chunk]
        stacked = torch.stack(mine + [torch.zeros_like(params[0])] * (chunk - len(mine)))
        rows, cols = params[0].shape
        if work is not None:
            work.wait()
        self._muon_update(stacked, grads, state["momentum_buffer"], state["second_moment"], group["lr"],
                          group["weight_decay"], group["momentum"], group["beta2"], max(1.0, rows / cols) ** 0.5,
                          self.orth_dtype, group["cautious"], group["normuon"], group["muon_eq"], group["muon_plus"])
        gathered, gather = stacked, None
        if W > 1:
            gathered = stacked.new_empty(W * chunk, rows, cols)
            gather = all_gather_single(gathered, stacked, async_op=True)

        def finish():
            if gather is not None:
                gather.wait()
            for p, new in zip(params, gathered):
                p.copy_(new)
        return finish

    def _update_adamw(self, group, reduced):
        gathers = []
        for p, (grad, work) in zip(group["params"], reduced):
            if work is not None:
                work.wait()
            span = self._adamw_rows(p)
            target = p.data if span is None else p.data[span[0]:span[1]]
            state = self.state[p]
            self._adamw_update(target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                               group["weight_decay"], group["beta1"], group["beta2"], group["eps"], group["cautious"])
            if span is not None:  # in-place all-gather: this rank's rows are already in place in p
                gathers.append(all_gather_single(p.data, target, async_op=True))
        def finish():
            for work in gathers:
                work.wait()
        return finish

    # -- schedules -----------------------------------------------------------------------

    @torch.no_grad()
    def update_hparams(self, lr_multiplier, weight_decay_multiplier=1.0, muon_momentum=None):
        """Sets each group's lr to initial * lr_multiplier, and each Muon group's weight_decay to
        initial * weight_decay_multiplier and its momentum, in place. AdamW weight decay stays
        constant (RECIPE: only Muon's decay has a schedule)."""
        for group in self.param_groups:
            group["lr"].fill_(group["initial_lr"] * lr_multiplier)
            if group["kind"] == "muon":
                group["weight_decay"].fill_(group["initial_weight_decay"] * weight_decay_multiplier)
                if muon_momentum is not None:
                    group["momentum"].fill_(muon_momentum)

    # -- state ---------------------------------------------------------------------------

    def state_dict(self):
        """This rank's state: plain tensors, numbers and strings (loads with torch.load(weights_only=True)).

        Tensors are references to the live state, as in torch.optim: save them before the next step.
        """
        groups, state, index = [], {}, 0
        for group in self.param_groups:
            saved = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params"}
            saved["param_shapes"] = [list(p.shape) for p in group["params"]]
            groups.append(saved)
            for p in group["params"]:
                if p in self.state:
                    state[index] = dict(self.state[p])
                index += 1
        return {"world_size": self.world_size, "rank": self.rank, "param_groups": groups, "state": state}

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Restores hyperparameters and state saved by this rank of a run with the same model and world size."""
        saved_ws, saved_rank = state_dict["world_size"], state_dict["rank"]
        if (saved_ws, saved_rank) != (self.world_size, self.rank):
            raise ValueError(f"optimizer state was saved by rank {saved_rank} of {saved_ws}, this is rank "
                             f"{self.rank} of {self.world_size}: the state is sharded, resume with "
                             f"{saved_ws} ranks")
        saved_groups = state_dict["param_groups"]
        layout = [(g["kind"], [list(p.shape) for p in g["params"]]) for g in self.param_groups]
        saved_layout = [(g["kind"], g["param_shapes"]) for g in saved_groups]
        if layout != saved_layout:
            raise ValueError("optimizer state does not match this model's parameter groups (kinds and shapes "
                             "differ): was it saved for another model config?")
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if isinstance(group.get(key), torch.Tensor):
                    group[key].fill_(value)
                elif key != "param_shapes":
                    group[key] = value
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            live = self.state[params[int(index)]]
            for key, value in saved.items():
                if live[key].shape != value.shape:
                    raise ValueError(f"optimizer state {key!r} of parameter {index} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(live[key].shape)}")
                live[key].copy_(value)
