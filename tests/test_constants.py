"""The record recipe's constants, checked through behaviour against computations written out by hand here:
q/k scale 1.2, the value-embedding gate's 3 * sigmoid, the logit soft-cap 15, Polar Express's coefficients and
1.01 safety margin, x0 taken after smear, and compiled-vs-eager closeness of the scalars' gradients.

Each test recomputes what the model or optimizer should produce from its weights and the published numbers,
with the constant written here once more (from RECIPE.md / the paper), so changing the constant in the
library makes the test fail (each was shown failing with its constant changed, dev/LOG.md 2026-12-02).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import nanochat.gpt as gpt
from nanochat.common import rel_err
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import polar_express

QK_SCALE = 1.2  # RECIPE R2: q and k x1.2 after RoPE + QK-norm
VE_GATE_FACTOR = 3.0  # RECIPE R1: value-embedding gate 3 * sigmoid (was 2)
SOFTCAP = 15.0  # logits 15 * tanh(z / 15)
ROTARY_BASE = 100_000
# Polar Express (Amsel et al. 2025, arXiv:2505.16932), the 5-iteration coefficients of the public
# modded-nanogpt / nanochat speedruns, and the 1% safety margin on the Frobenius normalisation (RECIPE R1)
PUBLISHED_POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.01


def tiny_model(depth=1, seed=0):
    """An fp32 CPU model with every weight random (init zeroes the output projections and the smear lambda)."""
    config = GPTConfig.from_depth(depth, vocab_size=256, sequence_len=32, head_dim=32)
    model = GPT.build(config, "cpu", seed=seed, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def by_hand_rms(x):
    return x / (x.square().mean(-1, keepdim=True) + torch.finfo(x.dtype).eps).sqrt()


def by_hand_rotary(x):
    """Rotates channel pairs (i, i + D/2) of x (B, T, H, D) by angle t * base^(-2i/D)."""
    T, D = x.size(1), x.size(-1)
    inv_freq = torch.tensor([ROTARY_BASE ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float64)
    angle = (torch.arange(T, dtype=torch.float64)[:, None] * inv_freq)[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * angle.cos() + x2 * angle.sin(), x2 * angle.cos() - x1 * angle.sin()], -1)


def attention_by_hand(attn, x, value_embed):
    """q, k, v and the output of one CausalSelfAttention (full causal window) from its weights."""
    B, T, _ = x.shape
    H, D = attn.n_head, attn.head_dim

    def heads(linear):
        return (x @ linear.weight.t()).view(B, T, H, D)
    q = by_hand_rotary(by_hand_rms(heads(attn.c_q))) * QK_SCALE
    k = by_hand_rotary(by_hand_rms(heads(attn.c_k))) * QK_SCALE
    gate_in = x[..., :attn.ve_gate.in_features]
    gate = VE_GATE_FACTOR / (1 + torch.exp(-(gate_in @ attn.ve_gate.weight.t())))  # (B, T, H)
    v = heads(attn.c_v) + gate[..., None] * value_embed.view(B, T, H, D)
    logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", logits.softmax(-1), v).reshape(B, T, H * D)
    return {"q": q, "k": k, "v": v, "logits": logits, "out": y @ attn.c_proj.weight.t()}


def run_attention(monkeypatch):
    """(what the model computed, the same by hand) for the single block of a d1 model (it has a value embedding)."""
    model = tiny_model()
    attn = model.blocks[0].attn
    assert attn.ve_gate is not None and model.window_sizes == [32]
    got = {}
    real_attention = gpt.attention

    def spy(q, k, v, window):
        got.update(q=q, k=k, v=v)
        return real_attention(q, k, v, window)
    monkeypatch.setattr(gpt, "attention", spy)
    attn.register_forward_pre_hook(lambda m, args: got.update(x=args[0], value_embed=args[1]))
    attn.register_forward_hook(lambda m, args, out: got.update(out=out))
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)))
        want = attention_by_hand(attn, got["x"], got["value_embed"])
    got["logits"] = torch.einsum("bthd,bshd->bhts", got["q"], got["k"]) / math.sqrt(attn.head_dim)
    return got, want


def test_attention_logits_use_qk_scale(monkeypatch):
    got, want = run_attention(monkeypatch)
    # QK-norm makes every q and k head vector unit-RMS: times 1.2, its norm is 1.2 * sqrt(head_dim)
    head_norm = got["q"].norm(dim=-1)
    torch.testing.assert_close(head_norm, torch.full_like(head_norm, QK_SCALE * math.sqrt(got["q"].size(-1))))
    causal = want["logits"].isfinite()
    torch.testing.assert_close(got["logits"][causal], want["logits"][causal], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["out"], want["out"], rtol=1e-4, atol=1e-5)


def test_value_embedding_gate_is_three_sigmoid(monkeypatch):
    got, want = run_attention(monkeypatch)
    torch.testing.assert_close(got["v"], want["v"], rtol=1e-5, atol=1e-6)


def test_logits_are_softcapped_at_15():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # raw logits far beyond the cap, so the cap decides the values
        idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
        raw = model.hidden_states(idx) @ model.lm_head.weight[:256].t()
        logits = model(idx)
        loss = model(idx[:, :-1], idx[:, 1:])
    assert raw.abs().max() > 3 * SOFTCAP
    want = SOFTCAP * torch.tanh(raw / SOFTCAP)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-4)
    assert logits.abs().max() <= SOFTCAP
    # the training loss (fused, chunked) reads the same capped logits
    want_loss = F.cross_entropy(want[:, :-1].reshape(-1, 256), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)


def polar_express_by_hand(s):
    """Singular values after Polar Express, from singular values s (float64): X / (||X||_F * 1.01),
    then each published (a, b, c) maps sigma -> a sigma + b sigma^3 + c sigma^5."""
    sigma = s / (s.norm() * POLAR_EXPRESS_SAFETY + 1e-6)
    for a, b, c in PUBLISHED_POLAR_EXPRESS:
        sigma = a * sigma + b * sigma ** 3 + c * sigma ** 5
    return sigma


@pytest.mark.parametrize("rows,cols", [(8, 24), (24, 8)])  # wide, and tall (iterated transposed)
def test_polar_express_matches_the_published_coefficients(rows, cols):
    g = torch.Generator().manual_seed(0)
    n = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, n, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(cols, n, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -3, n, dtype=torch.float64) * 5  # spread over three octaves of ten
    out = polar_express(U @ torch.diag(s) @ V.T, torch.float64)
    got = torch.linalg.svdvals(out)
    want = polar_express_by_hand(s).sort(descending=True).values
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # the singular vectors are kept: out = U diag(p(s)) V^T
    torch.testing.assert_close(out, U @ torch.diag(polar_express_by_hand(s)) @ V.T, rtol=0, atol=1e-9)
    # and the point of it: even a singular value 1000x below the largest ends near 1 (here 0.81 .. 1.14)
    assert 0.6 < got.min() and got.max() < 1.2


def test_x0_is_taken_after_smear():
    """Through the model's forward: with identity blocks (zero output projections) a d1 model's hidden state is
    rms_norm((1 - backout) * (resid * x + x0_lambda * x0)) with x = smear(e); x0 must be smear(e) too."""
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].attn.c_proj.weight.zero_()
        model.blocks[0].mlp.c_proj.weight.zero_()
        model.smear_lambda.fill_(1.0)
        model.x0_lambdas.fill_(0.5)
        idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
        hidden = model.hidden_states(idx)
        e = by_hand_rms(model.wte.weight[idx])
        gate = model.smear_lambda / (1 + torch.exp(-(e[:, 1:, :24] @ model.smear_gate.weight.t())))
        smeared = torch.cat([e[:, :1], e[:, 1:] + gate * e[:, :-1]], 1)
        x = model.resid_lambdas[0] * smeared + model.x0_lambdas[0] * smeared  # x0 = smeared
        want = by_hand_rms(x - model.backout_lambda * x)
    assert rel_err(smeared, e) > 0.1  # smearing really changes x0 here
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)


SCALARS = ("smear_gate.weight", "smear_lambda", "backout_lambda", "resid_lambdas", "x0_lambdas")


def test_compiled_scalar_gradients_match_eager():
    """The scalars' gradients through inductor's kernels equal eager's up to fp32 summation order. d3: the
    smallest depth whose backout reads a block before the last (L // 2 = 1), so its gradient is not ~0.
    Measured in fp32: <= 5e-6 relative, backout_lambda 2e-4 (its gradient is a sum with heavy cancellation,
    100x smaller than the others'); the bound is 10x that. A wrong kernel or a lost term gives O(1)."""
    model = tiny_model(depth=3)
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)  # smear on, so the smear gate gets a gradient
    idx = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(3))
    grads = []
    for step_model in (model, torch.compile(model, fullgraph=True, dynamic=False)):
        model.zero_grad(set_to_none=True)
        step_model(idx[:, :-1], idx[:, 1:]).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if name in SCALARS})
    eager, compiled = grads
    assert sorted(eager) == sorted(SCALARS) and all(g.abs().max() > 1e-4 for g in eager.values())
    errors = {name: rel_err(compiled[name], eager[name]) for name in SCALARS}
    assert max(errors.values()) < 2e-3, errors
