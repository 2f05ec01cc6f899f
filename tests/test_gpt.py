"""The GPT: shapes from depth, causality, window patterns, the fused loss, counts, precision, learning."""

import pytest
import torch

import nanochat.gpt as gpt
from nanochat.attention import naive_attention
from nanochat.common import rel_err
from nanochat.gpt import C_FC_INIT_SCALE, GPT, GPTConfig, fused_head_cross_entropy, plain_cross_entropy


def build(config, compute_dtype=torch.float32, seed=0):
    return GPT.build(config, "cpu", seed=seed, compute_dtype=compute_dtype)


def small_config(**overrides):
    fields = dict(vocab_size=500, sequence_len=64, head_dim=64, short_window=16, window_pattern="SL")
    return GPTConfig.from_depth(2, **{**fields, **overrides})


def perturb_weights(model, seed=1):
    """init_weights zeroes the output projections; give every weight some signal for sharper tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("depth,width,heads", [(4, 256, 2), (12, 768, 6), (20, 1280, 10), (24, 1536, 12), (26, 1664, 13)])
def test_from_depth_shapes(depth, width, heads):
    cfg = GPTConfig.from_depth(depth)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_dim) == (depth, width, heads, 128)
    assert cfg.window_sizes()[-1] == cfg.sequence_len
    assert cfg.window_sizes()[:4] == [512, 512, 512, 2048]


def test_tiny_depths_and_head_dim():
    assert GPTConfig.from_depth(1).n_embd == 128
    cfg = GPTConfig.from_depth(2, head_dim=32)
    assert (cfg.n_embd, cfg.n_head) == (128, 4)
    with pytest.raises(ValueError, match="depth"):
        GPTConfig.from_depth(0)
    with pytest.raises(ValueError, match="window_pattern"):
        GPTConfig.from_depth(2, window_pattern="SXL")


def test_value_embeds_alternate_and_include_last():
    cfg = GPTConfig.from_depth(5)
    assert [cfg.has_value_embed(i) for i in range(5)] == [True, False, True, False, True]


def test_counts_and_flops_by_hand():
    model = build(small_config())  # d2, width 128, 2 heads of 64, vocab 500 -> 512, windows [16, 64]
    per_block = 4 * 128 * 128 + 2 * 128 * 512
    ve_gate = 12 * 2  # only the last layer has a value embedding (and its gate)
    counts = model.num_params_by_kind()
    assert counts == {"wte": 512 * 128, "value_embeds": 512 * 128, "matrices": 2 * per_block + ve_gate,
                      "lm_head": 512 * 128, "scalars": 2 + 2 + 24 + 1 + 1}  # lambdas, smear gate, smear, backout
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert model.num_scaling_params() == 2 * per_block + ve_gate + 512 * 128
    assert model.estimate_flops() == 6 * (2 * per_block + ve_gate + 512 * 128) + 12 * 2 * 64 * (16 + 64)


def test_meta_construction_d12():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(12))
    assert model.config.n_embd == 768 and model.config.n_head == 6
    assert model.estimate_flops() > 6 * model.num_scaling_params()


def test_causality():
    model = build(small_config())
    perturb_weights(model)
    idx = torch.randint(0, 500, (2, 64))
    idx2 = idx.clone()
    idx2[:, 40:] = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    assert torch.equal(a[:, :40], b[:, :40])
    assert not torch.allclose(a[:, 40:], b[:, 40:])


@pytest.mark.parametrize("pattern", ["L", "SL", "SSSL", "LSLS"])
def test_window_patterns_match_naive_attention(pattern, monkeypatch):
    model = build(small_config(window_pattern=pattern, short_window=8))
    perturb_weights(model)
    idx = torch.randint(0, 500, (2, 64))
    with torch.no_grad():
        fast = model(idx)
        monkeypatch.setattr(gpt, "attention", naive_attention)
        slow = model(idx)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_equals_plain(dtype, tol, reduction, monkeypatch):
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", 150 * 128)  # 128-row chunks: 1000 rows -> 8 chunks
    torch.manual_seed(0)
    x = torch.randn(1000, 32).to(dtype).requires_grad_()
    w = (torch.randn(192, 32) * 0.5).requires_grad_()  # padded vocab 192, real vocab 150
    t = torch.randint(0, 150, (1000,))
    t[::7] = -1
    fused = fused_head_cross_entropy(x, w, t, 150, 15.0, reduction)
    gx, gw = torch.autograd.grad(fused, (x, w))
    plain = plain_cross_entropy(x, w, t, 150, 15.0, reduction)
    px, pw = torch.autograd.grad(plain, (x, w))
    torch.testing.assert_close(fused, plain, rtol=tol, atol=0)
    assert gx.dtype == dtype and gw.dtype == torch.float32
    assert (gw[150:] == 0).all()  # padded vocab rows never get gradient
    for g, p in ((gx, px), (gw, pw)):
        assert (g.float() - p.float()).norm() <= tol * p.float().norm()


def _loss_scaled_grads(loss_fn, x, w, t, vocab_size, loss_scale):
    """(grad_x, grad_w) of loss_fn as DynamicLossScaler trains: backward of loss * scale, then / scale."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    (loss_fn(x, w, t, vocab_size, 15.0) * loss_scale).backward()
    return x.grad.float() / loss_scale, w.grad / loss_scale


def test_fp16_fused_loss_keeps_small_logit_gradients():
    # issue 14: the fused loss cast (p - y) / N to fp16 in forward, before the loss scale arrives in
    # backward; the old code was 2e-2 (grad_x) and 7e-3 (grad_w) off the unfused path here, at vocab
    # 8192 and 1024 tokens (real runs: vocab 32768, 32k+ tokens per micro-batch, far worse)
    N, V, d = 1024, 8192, 16
    torch.manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(N, d), (d,))  # the GPT's hidden states are RMS-normed
    w = torch.randn(V, d) * 0.02
    t = torch.randint(0, V, (N,))
    fused = _loss_scaled_grads(fused_head_cross_entropy, x.half(), w, t, V, 2.0**16)
    plain = _loss_scaled_grads(plain_cross_entropy, x.half(), w, t, V, 2.0**16)
    exact = _loss_scaled_grads(plain_cross_entropy, x, w, t, V, 1.0)
    for name, f, p, e in zip(("grad_x", "grad_w"), fused, plain, exact):
        assert rel_err(f, p) < 1e-3, (name, rel_err(f, p))
        assert rel_err(f, e) < 1.5 * rel_err(p, e), name  # fp16 rounding only (measured 3.3e-4 both)


def test_fp16_fused_loss_chunk_cannot_overflow():
    # worst case for the unscaled fp16 grad_w product: every row has the same target and the largest
    # value an RMS-normed row can hold (sqrt(d)) in one channel: 20000 rows * 4 > 65504 in one chunk
    N, V, d = 20000, 64, 16
    x = torch.zeros(N, d, dtype=torch.float16)
    x[:, 0] = d**0.5
    w = torch.randn(V, d) * 0.02
    t = torch.zeros(N, dtype=torch.long)
    grad_x, grad_w = _loss_scaled_grads(fused_head_cross_entropy, x, w, t, V, 1.0)
    assert grad_x.isfinite().all() and grad_w.isfinite().all()
    exact_x, exact_w = _loss_scaled_grads(plain_cross_entropy, x.float(), w, t, V, 1.0)
    assert rel_err(grad_w, exact_w) < 1e-2


def test_per_token_losses_match_plain():
    model = build(small_config())
    perturb_weights(model)
    idx, tgt = torch.randint(0, 500, (2, 64)), torch.randint(0, 500, (2, 64))
    tgt[0, :10] = -1
    with torch.no_grad():
        per_token = model(idx, tgt, loss_reduction="none")
        logits = model(idx)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-1, reduction="none")
    assert per_token.shape == (2, 64)
    torch.testing.assert_close(per_token.flatten(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(idx, tgt), per_token.sum() / (tgt >= 0).sum(), rtol=1e-5, atol=0)


def test_bf16_forward_agrees_with_fp32():
    cfg = small_config()
    fp32, bf16 = build(cfg, torch.float32), build(cfg, torch.bfloat16)
    perturb_weights(fp32), perturb_weights(bf16)
    idx, tgt = torch.randint(0, 500, (2, 64)), torch.randint(0, 500, (2, 64))
    with torch.no_grad():
        a, b = fp32(idx), bf16(idx)
        la, lb = fp32(idx, tgt), bf16(idx, tgt)
    assert b.dtype == torch.float32  # logits are always fp32
    assert (a - b).norm() / a.norm() < 2e-2
    assert abs(la - lb) / la < 1e-2


def test_overfits_one_batch():
    model = build(small_config())
    idx = torch.randint(0, 500, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(50):
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] > 5.5  # ~ln(500) at init
    assert losses[-1] < 0.3 * losses[0]


def test_sequence_too_long_is_an_error():
    model = build(small_config())
    with pytest.raises(ValueError, match="sequence_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_generate_greedy_is_deterministic():
    model = build(small_config())
    perturb_weights(model)
    a = list(model.generate([1, 2, 3], 8))
    b = list(model.generate([1, 2, 3], 8))
    assert a == b and len(a) == 8 and all(0 <= t < 500 for t in a)


# -----------------------------------------------------------------------------
# the record recipe's architecture pieces (shared RECIPE.md) and the explicit init

def test_short_window_is_a_quarter_rounded_up_to_128():
    """RECIPE: S = -(-T//4 // 128) * 128: 512 at T=2048 (SSSL, last layer long)."""
    cfg = GPTConfig.from_depth(24, sequence_len=2048)
    sizes = cfg.window_sizes()
    assert sizes[:4] == [512, 512, 512, 2048] and sizes[-1] == 2048
    assert [i for i, w in enumerate(sizes) if w == 2048] == [3, 7, 11, 15, 19, 23]
    assert GPTConfig.from_depth(4, sequence_len=256).window_sizes() == [128, 128, 128, 256]


def test_smear_adds_gated_previous_embedding():
    model = build(small_config())
    e = torch.randn(2, 10, 128)
    with torch.no_grad():
        assert torch.equal(model.smear(e), e)  # lambda_s = 0 at init: smear starts off
        model.smear_lambda.fill_(0.7)
        out = model.smear(e)
    gate = 0.7 * torch.sigmoid(e[:, 1:, :gpt.SMEAR_CHANNELS] @ model.smear_gate.weight.t())
    assert torch.equal(out[:, 0], e[:, 0])
    torch.testing.assert_close(out[:, 1:], e[:, 1:] + gate * e[:, :-1])


def test_frozen_smear_stays_off_while_the_rest_trains():
    """--smear 0 (GPT.freeze_smear): after real optimizer steps the smear lambda and gate are untouched, so
    every forward equals one with smear bypassed; unfrozen, the same steps move the lambda off 0."""
    idx = torch.randint(0, 500, (4, 33))
    lambdas = {}
    for frozen in (True, False):
        model = build(small_config())
        if frozen:
            model.freeze_smear()
        gate_before = model.smear_gate.weight.detach().clone()
        opt = model.setup_optimizer(compiled=False)
        for _ in range(3):
            model(idx[:, :-1], idx[:, 1:]).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        lambdas[frozen] = model.smear_lambda.item()
        if frozen:
            assert torch.equal(model.smear_gate.weight, gate_before)
            with torch.no_grad():
                loss = model(idx[:, :-1], idx[:, 1:])
                model.smear = lambda e, *rest: e
                assert torch.equal(loss, model(idx[:, :-1], idx[:, 1:]))
    assert lambdas[True] == 0.0 and lambdas[False] != 0.0, lambdas


def test_backout_subtracts_the_mid_depth_residual():
    model = build(GPTConfig.from_depth(4, vocab_size=500, sequence_len=32, head_dim=64))
    perturb_weights(model)
    outputs = {}
    for i in (2, 3):  # L // 2 = 2 is cached, 3 is the last block
        model.blocks[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
    idx = torch.randint(0, 500, (2, 32))
    with torch.no_grad():
        model.backout_lambda.fill_(0.3)
        hidden = model.hidden_states(idx)
    expected = torch.nn.functional.rms_norm(outputs[3] - 0.3 * outputs[2], (outputs[3].size(-1),))
    torch.testing.assert_close(hidden, expected)


def test_norm_gains_scale_the_pre_mlp_and_final_norms_only():
    """Selective RMSNorm scales (--norm-gains 1): at init (gains 1) the model equals the gain-free one; with gains
    set, each block's MLP reads rms_norm(x) * its gain, the head reads the final norm * its gain, and the
    attention input stays parameter-free. Fails if a gain is ignored or applied to the wrong norm."""
    idx = torch.randint(0, 500, (2, 33))
    plain, gained = build(small_config()), build(small_config(norm_gains=True))
    perturb_weights(plain)
    missing = gained.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["final_norm_gain", "mlp_norm_gains"]  # the gains stay at their init, 1
    with torch.no_grad():
        torch.testing.assert_close(gained(idx[:, :-1], idx[:, 1:]), plain(idx[:, :-1], idx[:, 1:]), rtol=0, atol=0)
        g = torch.Generator().manual_seed(3)
        gained.mlp_norm_gains.copy_(1 + torch.rand(gained.mlp_norm_gains.shape, generator=g))
        gained.final_norm_gain.copy_(1 + torch.rand(gained.final_norm_gain.shape, generator=g))
    seen = {}
    for i, block in enumerate(gained.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("block_in", i), args[0]))
        block.attn.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("attn_in", i), args[0]))
        block.attn.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("attn_out", i), out))
        block.mlp.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(("mlp_in", i), args[0]))
    norm = lambda t: torch.nn.functional.rms_norm(t, (t.size(-1),))
    with torch.no_grad():
        hidden = gained.hidden_states(idx)
    for i in range(len(gained.blocks)):
        x = seen[("block_in", i)]
        torch.testing.assert_close(seen[("attn_in", i)], norm(x), rtol=0, atol=0)
        torch.testing.assert_close(seen[("mlp_in", i)], norm(x + seen[("attn_out", i)]) * gained.mlp_norm_gains[i])
    # the final norm: its gain is the only difference to the same weights with unit final gain
    with torch.no_grad():
        final_gain = gained.final_norm_gain.clone()
        gained.final_norm_gain.fill_(1.0)
        torch.testing.assert_close(hidden, gained.hidden_states(idx) * final_gain)


def test_norm_gains_train_with_the_resid_lambdas():
    """The gains sit in the resid-lambda AdamW group (lr scalar_lr * 0.01, wd 0.05) and move under training."""
    model = build(small_config(norm_gains=True))
    opt = model.setup_optimizer(scalar_lr=0.5, compiled=False)
    group = next(g for g in opt.param_groups if any(p is model.resid_lambdas for p in g["params"]))
    assert any(p is model.mlp_norm_gains for p in group["params"]) and any(p is model.final_norm_gain for p in group["params"])
    assert group["lr"] == 0.5 * 0.01 and group["weight_decay"] == 0.05
    idx = torch.randint(0, 500, (4, 33))
    for _ in range(3):
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    assert (model.mlp_norm_gains != 1).any() and (model.final_norm_gain != 1).any()
    with pytest.raises(ValueError, match="fp16"):
        GPT(small_config(norm_gains=True), compute_dtype=torch.float16)


@pytest.mark.parametrize("norm_gains", [False, True])
def test_init_weights_writes_every_parameter_and_buffer(norm_gains):
    """GPT.build materialises uninitialised memory; init_weights must overwrite all of it (RECIPE: the
    reference's record left smear/backout uninitialised). Fill everything with NaN first: nothing may stay NaN."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(4, vocab_size=500, sequence_len=32, head_dim=64, norm_gains=norm_gains))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not t.isnan().any(), f"{name} is not written by init_weights"


def test_init_follows_the_record_recipe():
    """RECIPE "Initialization": wte N(0, 0.8^2), c_fc at 0.4x the uniform bound, per-layer lambda schedules,
    gates U(0, 0.02), smear off, backout 0.2."""
    model = build(GPTConfig.from_depth(5, vocab_size=4096, sequence_len=32, head_dim=64))
    bound = (3 / 320) ** 0.5
    assert abs(model.wte.weight.std().item() - 0.8) < 0.01
    c_fc = model.blocks[0].mlp.c_fc.weight
    assert 0.39 * bound < c_fc.abs().max() <= 0.4 * bound
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.125, 1.10, 1.075, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.1625, 0.125, 0.0875, 0.05]))
    for gate in [model.smear_gate.weight] + [b.attn.ve_gate.weight for b in model.blocks if b.attn.ve_gate is not None]:
        assert gate.min() >= 0 and 0.015 < gate.max() <= 0.02
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)


def test_c_fc_init_scale_sets_only_c_fc():
    """--c-fc-init-scale (the init split's A/B knob): 1.0 is the plain bound; every other weight is drawn as before."""
    config = GPTConfig.from_depth(2, vocab_size=512, sequence_len=32, head_dim=64)
    bound = (3 / config.n_embd) ** 0.5
    recipe, plain = (GPT.build(config, "cpu", seed=0, c_fc_init_scale=s) for s in (C_FC_INIT_SCALE, 1.0))
    assert 0.97 * bound < plain.blocks[0].mlp.c_fc.weight.abs().max() <= bound
    torch.testing.assert_close(plain.blocks[1].mlp.c_fc.weight, recipe.blocks[1].mlp.c_fc.weight / C_FC_INIT_SCALE)
    torch.testing.assert_close(plain.blocks[1].attn.c_q.weight, recipe.blocks[1].attn.c_q.weight)
