"""MuonAdamW: AdamW against torch.optim.AdamW, Muon's orthogonality, cautious decay, no recompiles,
2-rank gloo training against one process, and exact resume from state_dict."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import MuonAdamW, muon_eq, muon_plus, normuon_normalize

sys.path.insert(0, str(Path(__file__).parent))
import dist_optim_worker  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def adamw_group(params, **kw):
    return dict(kind="adamw", params=params, **{"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-10, **kw})


def muon_group(params, **kw):
    return dict(kind="muon", params=params, **{"lr": 0.02, "momentum": 0.95, **kw})


def quadratic_grads(params, targets):
    loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets))
    loss.backward()


# -----------------------------------------------------------------------------
# AdamW

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_adamw(weight_decay):
    torch.manual_seed(0)
    init = [torch.randn(16, 8), torch.randn(8)]
    ours = [p.clone().requires_grad_() for p in init]
    theirs = [p.clone().requires_grad_() for p in init]
    opt = MuonAdamW([adamw_group(ours, weight_decay=weight_decay, cautious=False)], compiled=False)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    x, y = torch.randn(32, 16), torch.randn(32, 8)
    for _ in range(30):
        for (w, b), o in ((ours, opt), (theirs, ref)):
            ((x @ w + b - y) ** 2).mean().backward()
            o.step()
            w.grad = b.grad = None
        for a, r in zip(ours, theirs):
            # atol: fp32 rounding of the bias-correction scalars (ours 0-D fp32 tensors, torch's
            # Python doubles) leaves ~2 ulp (2e-7) differences, relatively large only near zero
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_adamw_bf16_param_math_in_fp32():
    """A bf16 parameter gets exactly the fp32 result rounded to bf16: state and math stay fp32."""
    torch.manual_seed(0)
    init = torch.randn(64).bfloat16().float()
    grad = torch.randn(64).bfloat16().float()
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        p = init.to(dtype, copy=True).requires_grad_()
        opt = MuonAdamW([adamw_group([p], weight_decay=0.1)], compiled=False)
        assert all(t.dtype == torch.float32 for t in opt.state[p].values())
        p.grad = grad.to(dtype)
        opt.step()
        results.append(p.detach())
    assert torch.equal(results[0].bfloat16(), results[1])


# -----------------------------------------------------------------------------
# Muon

def with_spectrum(rows, cols, singular_values, generator):
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=generator))
    return u @ torch.diag(singular_values) @ v.T


# Polar Express maps singular values in [1e-3, 1] x the Frobenius norm into [0.847, 1.141] (the
# scalar polynomial composition, evaluated in fp64); bf16 matmuls add a few 1e-3. Singular values
# far below 1e-3 of the norm (a random square matrix's tail) are only partly lifted.
BANDS = {torch.float32: (0.84, 1.15), torch.bfloat16: (0.83, 1.16)}


def one_muon_update(grads, orth_dtype, normuon, muon_eq=False, muon_plus=False):
    """-(p after one step from p = 0) / lr_scale, with lr 1, momentum 0, no decay: the raw update."""
    rows, cols = grads[0].shape
    params = [torch.zeros(rows, cols, requires_grad=True) for _ in grads]
    opt = MuonAdamW([muon_group(params, lr=1.0, momentum=0.0, weight_decay=0.0, normuon=normuon,
                                muon_eq=muon_eq, muon_plus=muon_plus)],
                    compiled=False, orth_dtype=orth_dtype)
    for p, grad in zip(params, grads):
        p.grad = grad
    opt.step()
    lr_scale = max(1.0, rows / cols) ** 0.5  # shape-aware LR
    return [-p.detach() / lr_scale for p in params]


def gradient_like(shape, generator):
    rows, cols = shape
    k = min(shape)
    grads = [torch.randn(rows, cols, generator=generator),  # well conditioned unless square
             with_spectrum(rows, cols, torch.logspace(0, -2, k), generator)]  # condition number 100
    return grads[1:] if rows == cols else grads


@pytest.mark.parametrize("orth_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)])
def test_one_muon_update_is_semi_orthogonal(shape, orth_dtype):
    grads = gradient_like(shape, torch.Generator().manual_seed(0))
    lo, hi = BANDS[orth_dtype]
    for update, grad in zip(one_muon_update(grads, orth_dtype, normuon=False), grads):
        s = torch.linalg.svdvals(update)
        assert len(s) == min(shape) and lo <= s.min() and s.max() <= hi, (shape, s.min().item(), s.max().item())
        assert (update * grad).sum() > 0  # ~U V^T of the gradient U S V^T: a descent direction


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)])
def test_normuon_update_is_balanced_orthogonal_update(shape):
    """With NorMuon (the default) the update is the orthogonal one with its rows (tall) or columns
    (wide) rescaled to equal RMS and the Frobenius norm kept: sqrt(min(rows, cols)) within the band."""
    grads = gradient_like(shape, torch.Generator().manual_seed(0))
    lo, hi = BANDS[torch.float32]
    plain = one_muon_update(grads, torch.float32, normuon=False)
    for update, orthogonal in zip(one_muon_update(grads, torch.float32, normuon=True), plain):
        assert lo <= update.norm() / min(shape) ** 0.5 <= hi
        torch.testing.assert_close(update.norm(), orthogonal.norm())
        vector_rms = update.square().mean(dim=-1 if shape[0] >= shape[1] else 0).sqrt()
        torch.testing.assert_close(vector_rms, vector_rms.mean().expand_as(vector_rms), rtol=1e-4, atol=0)
        assert (update * orthogonal).sum() > 0.9 * update.norm() * orthogonal.norm()  # a small correction


def test_normuon_equalises_rows_and_keeps_norm():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(2, 48, 16, generator=g) * torch.linspace(0.2, 3.0, 48)[:, None]  # uneven row sizes
    second_moment = torch.zeros(2, 48, 1)
    V = normuon_normalize(U, second_moment, torch.tensor(0.95))
    torch.testing.assert_close(V.norm(dim=(-2, -1)), U.norm(dim=(-2, -1)))
    row_rms = V.square().mean(-1).sqrt()
    torch.testing.assert_close(row_rms, row_rms.mean(-1, keepdim=True).expand_as(row_rms))


def test_muon_eq_equalises_row_norms_and_keeps_frobenius_norm():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 48, 16, generator=g) * torch.linspace(0.1, 5.0, 48)[:, None]
    Y = muon_eq(X)
    torch.testing.assert_close(Y.norm(dim=-1), (X.norm(dim=(-2, -1)) / 48 ** 0.5)[:, None].expand(2, 48))
    torch.testing.assert_close(Y.norm(dim=(-2, -1)), X.norm(dim=(-2, -1)))
    assert torch.equal(muon_eq(torch.zeros(1, 4, 3)), torch.zeros(1, 4, 3))  # zero padding stays zero


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_muon_plus_sets_the_semi_orthogonal_norm(shape):
    grads = gradient_like(shape, torch.Generator().manual_seed(0))
    U = torch.stack(one_muon_update(grads, torch.float32, normuon=False))
    torch.testing.assert_close(muon_plus(U).norm(dim=(-2, -1)), torch.full((len(grads),), min(shape) ** 0.5))
    for eq, plus in ((True, False), (False, True), (True, True)):  # the switches reach the step
        switched = one_muon_update(grads, torch.float32, normuon=False, muon_eq=eq, muon_plus=plus)
        assert not torch.allclose(torch.stack(switched), U)
        if plus:
            torch.testing.assert_close(torch.stack(switched).norm(dim=(-2, -1)), torch.full((len(grads),), min(shape) ** 0.5))


# -----------------------------------------------------------------------------
# cautious weight decay

@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_cautious_decay_only_where_signs_agree(kind):
    """Same init and gradient, weight decay 0 vs 0.5: the parameters may differ only where the
    update and the parameter agree in sign (decayed there by exactly lr * wd * p)."""
    torch.manual_seed(0)
    init, grad = torch.randn(24, 16), torch.randn(24, 16)
    lr = 0.05
    results = {}
    for wd, cautious in ((0.0, True), (0.5, True), (0.5, False)):
        p = init.clone().requires_grad_()
        group = adamw_group([p]) if kind == "adamw" else muon_group([p], momentum=0.0)
        opt = MuonAdamW([{**group, "lr": lr, "weight_decay": wd, "cautious": cautious}], compiled=False)
        p.grad = grad.clone()
        opt.step()
        results[wd, cautious] = p.detach()
    plain = results[0.0, True]
    update = init - plain          # the step without decay: p moves by -update
    agree = (update * init) >= 0
    assert 0.2 < agree.float().mean() < 0.8  # both kinds of coordinate are present
    cautious = results[0.5, True]
    assert torch.equal(cautious[~agree], plain[~agree])  # untouched where signs disagree
    decay = plain - cautious
    # Muon's lr includes the shape factor max(1, rows/cols)^0.5, for the decay too (RECIPE)
    lr_eff = lr * (1.5 ** 0.5 if kind == "muon" else 1.0)
    torch.testing.assert_close(decay[agree], lr_eff * 0.5 * init[agree], rtol=1e-4, atol=1e-6)
    everywhere = plain - results[0.5, False]  # not cautious: every coordinate decays
    torch.testing.assert_close(everywhere, lr_eff * 0.5 * init, rtol=1e-4, atol=1e-6)


def test_cautious_mask_decays_where_the_update_is_zero():
    """RECIPE: mask = (u * p >= 0): a coordinate whose update is exactly 0 is still decayed."""
    from nanochat.optim import decay_rate
    update, p = torch.tensor([0.0, 1.0, -1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0, 0.0])
    assert decay_rate(update, p, torch.tensor(0.1), cautious=True).tolist() == pytest.approx([0.1, 0.1, 0.0, 0.1])


# -----------------------------------------------------------------------------
# compile: hyperparameters are tensors, so schedules never recompile

def tiny_problem():
    torch.manual_seed(0)
    matrices = [torch.randn(8, 4, requires_grad=True) for _ in range(2)]
    vector = torch.randn(16, requires_grad=True)
    targets = [torch.randn(8, 4), torch.randn(8, 4), torch.randn(16)]
    return [*matrices, vector], targets


def run_schedule(compiled, steps=21):
    """Steps a tiny Muon + AdamW problem while a schedule moves lr, wd, momentum and beta1 every step.

    With compiled=True, the first step compiles (one graph per group shape) and any compile after
    it raises (dynamo's error_on_recompile); the compile counters must not move either.
    """
    params, targets = tiny_problem()
    opt = MuonAdamW([muon_group(params[:2], weight_decay=0.2), adamw_group(params[2:], weight_decay=0.1)],
                    compiled=compiled, orth_dtype=torch.float32)

    def one_step(step):
        quadratic_grads(params, targets)
        opt.update_hparams(lr_multiplier=1 - step / steps, weight_decay_multiplier=0.5 + step / steps,
                           muon_momentum=0.85 + step / 200)
        opt.param_groups[1]["beta1"].fill_(0.8 + step / 200)
        opt.step()
        for p in params:
            p.grad = None

    one_step(0)
    graphs, compiles = counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(1, steps):
            one_step(step)
    if compiled:
        assert graphs == 2  # one Muon shape, one AdamW shape
        assert (counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"]) == (graphs, compiles)
    return params


def test_no_recompiles_when_hyperparameters_change():
    torch._dynamo.reset()
    counters.clear()
    compiled = run_schedule(compiled=True)
    eager = run_schedule(compiled=False)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)  # the compiled update is the same math


# -----------------------------------------------------------------------------
# state_dict: exact resume

def train_steps(model, optimizer, steps, first_step, seed=0):
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(seed + step)
        rows = torch.randint(0, 256, (4, 33), generator=g)
        model(rows[:, :-1], rows[:, 1:]).backward()
        optimizer.update_hparams(1 - step / 20, 1 - step / 40, 0.85 + step / 100)
        optimizer.step()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(compute_dtype):
    """Also with bf16 compute, where wte and the value embeddings are stored in bf16 (AdamW state fp32)."""
    model = dist_optim_worker.build_model(compute_dtype)
    assert model.wte.weight.dtype == compute_dtype and model.lm_head.weight.dtype == torch.float32
    optimizer = model.setup_optimizer(weight_decay=0.1, compiled=False)
    train_steps(model, optimizer, 3, first_step=0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train_steps(model, optimizer, 3, first_step=3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = dist_optim_worker.build_model(compute_dtype)
    torch.manual_seed(123)
    resumed.init_weights()  # different weights, so the load has to do the work
    resumed.load_state_dict(saved["model"])
    resumed_opt = resumed.setup_optimizer(weight_decay=0.0, compiled=False)  # wrong wd: the load restores it
    resumed_opt.load_state_dict(saved["optimizer"])
    train_steps(resumed, resumed_opt, 3, first_step=3)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_load_state_dict_refuses_other_world_size_or_model():
    model = dist_optim_worker.build_model()
    state = model.setup_optimizer(compiled=False).state_dict()
    with pytest.raises(ValueError, match="resume with 2 ranks"):
        model.setup_optimizer(compiled=False).load_state_dict({**state, "world_size": 2})
    other = GPT(GPTConfig.from_depth(1, vocab_size=256, sequence_len=32, head_dim=32))
    with pytest.raises(ValueError, match="another model config"):
        other.setup_optimizer(compiled=False).load_state_dict(state)


# -----------------------------------------------------------------------------
# setup_optimizer's grouping

def test_setup_optimizer_groups_every_parameter_once():
    model = GPT(GPTConfig.from_depth(2, vocab_size=256, sequence_len=32, head_dim=32))
    optimizer = model.setup_optimizer(compiled=False)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    muon = {p for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert muon == set(model.blocks.parameters())
    for g in optimizer.param_groups:
        assert g["lr"].dim() == 0 and g["lr"].dtype == torch.float32
        assert g["lr"].item() == pytest.approx(g["initial_lr"])
    width_scale = (128 / 768) ** -0.5
    wte_group = next(g for g in optimizer.param_groups if any(p is model.wte.weight for p in g["params"]))
    assert wte_group["initial_lr"] == pytest.approx(0.3 * width_scale)


# -----------------------------------------------------------------------------
# distributed: 2 ranks (gloo) == 1 process on the same global batch

def test_two_ranks_match_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}  # fp32 on CPU
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_optim_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    model, _, losses = dist_optim_worker.train()
    assert losses[-1] < 0.8 * losses[0]  # it trained
    assert ranks[0]["wte_state_shape"] == [128, 192]  # AdamW state is sharded: half of wte's 256 rows
    for name, p in model.named_parameters():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"ranks differ on {name}"
        # Muon matrices agree to a few fp32 ulps (measured max 1.4e-7). The embeddings take Adam
        # steps of lr 0.73 (0.3 x the width scale) where m/sqrt(v) of a rarely-seen row amplifies
        # summation-order noise: measured max 7e-5, i.e. 1e-4 of one step
        tol = dict(rtol=1e-5, atol=1e-6) if name.startswith("blocks.") else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ranks[0]["params"][name], p.detach(), **tol, msg=name)


def test_setup_optimizer_follows_the_recipe_table():
    """RECIPE "AdamW groups": LR, betas, eps 1e-10 and constant plain decoupled WD per group; Muon: NorMuon beta2 0.9."""
    model = GPT(GPTConfig.from_depth(2, vocab_size=256, sequence_len=32, head_dim=32))
    optimizer = model.setup_optimizer(compiled=False)
    s = (128 / 768) ** -0.5
    expected = {  # first parameter -> (lr, beta1, beta2, wd)
        model.lm_head.weight: (0.008 * s, 0.8, 0.96, 0.01), model.wte.weight: (0.3 * s, 0.8, 0.995, 0.001),
        model.value_embeds["1"].weight: (0.15 * s, 0.8, 0.995, 0.01), model.resid_lambdas: (0.005, 0.8, 0.95, 0.05),
        model.x0_lambdas: (0.5, 0.96, 0.95, 0.0), model.smear_gate.weight: (0.2, 0.8, 0.95, 0.0)}
    adamw = [g for g in optimizer.param_groups if g["kind"] == "adamw"]
    assert len(adamw) == len(expected)
    for g in adamw:
        lr, beta1, beta2, wd = expected[g["params"][0]]
        got = (g["lr"].item(), g["beta1"].item(), g["beta2"].item(), g["weight_decay"].item())
        assert got == pytest.approx((lr, beta1, beta2, wd), rel=1e-6), g["params"][0].shape
        assert g["eps"].item() == pytest.approx(1e-10) and not g["cautious"]
    for g in optimizer.param_groups:
        if g["kind"] == "muon":
            assert g["beta2"].item() == pytest.approx(0.9) and g["muon_eq"] and g["muon_plus"] and g["cautious"]
    optimizer.update_hparams(lr_multiplier=0.5, weight_decay_multiplier=0.0)  # only Muon's decay is scheduled
    assert all(g["weight_decay"].item() == pytest.approx(expected[g["params"][0]][3]) for g in adamw)
