"""The KV-cache engine: cached logits equal a full forward at every step, sampling, stopping, refusals."""

import pytest
import torch

from nanochat import engine
from nanochat.common import rel_err
from nanochat.gpt import GPT, GPTConfig

VOCAB, T, SHORT = 300, 64, 8


def tiny_model(seed=0):
    """d3, windows [8, 64, 64] (SL, last long), value embeds on layers 0 and 2 (a short layer has one),
    backout after block 1, 4 query heads on 2 kv heads; every scalar mechanism set away from its init."""
    config = GPTConfig(sequence_len=T, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2, n_embd=128,
                       window_pattern="SL", short_window=SHORT)
    model = GPT.build(config, "cpu", seed=seed, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # init zeroes the output projections: give every weight signal
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.smear_lambda.fill_(0.8)
        model.smear_gate.weight.mul_(20)  # gates spread over (0, 1), not all ~0.5
        model.backout_lambda.fill_(0.4)
        model.resid_lambdas.copy_(torch.rand(3, generator=g) + 0.5)
        model.x0_lambdas.copy_(torch.rand(3, generator=g) * 0.5)
    return model


def full_logits(model, row):
    with torch.no_grad():
        return model(torch.tensor([row]))[0, -1]


def check_every_step(model, prompts, steps, chunk_at=None):
    """Feeds random tokens step by step (a 5-token chunk at step chunk_at); returns the largest relative error
    of each row's cached logits against a full forward over that row's own tokens."""
    g = torch.Generator().manual_seed(3)
    rows = [list(p) for p in prompts]
    fed = steps + (4 if chunk_at is not None else 0)  # tokens fed after the prompts
    cache, idx = engine.start(model, prompts, fed + 1)
    worst = 0.0
    with torch.no_grad():
        logits = engine.step(model, cache, idx)
        for i in range(steps):
            worst = max(worst, *(rel_err(logits[b], full_logits(model, row)) for b, row in enumerate(rows)))
            new = torch.randint(0, VOCAB, (len(rows), 5 if i == chunk_at else 1), generator=g)
            for row, ids in zip(rows, new.tolist()):
                row.extend(ids)
            logits = engine.step(model, cache, new)
    return worst


def test_cached_logits_equal_full_forward_at_every_step():
    """Rows of 3, 11 and 24 tokens (left padding 21, 13, 0) decoded to 63 tokens, with a 5-token chunk at
    step 10: far past the short window of 8, through the ring's wrap, every row at its own positions."""
    model = tiny_model()
    prompts = [[1, 2, 3], list(range(10, 21)), list(range(40, 64))]
    worst = check_every_step(model, prompts, steps=35, chunk_at=10)
    assert worst <= 1e-5, worst


def test_short_window_layers_keep_only_their_window():
    model = tiny_model()
    cache, _ = engine.start(model, [[1] * 10, [2] * 4], 40)
    assert [layer.k.size(2) for layer in cache.layers] == [SHORT, 49, 49]  # ring of 8; longs hold all 10 + 40 - 1


def test_prefill_longer_than_the_window_and_single_token_prompts():
    model = tiny_model(seed=5)
    assert check_every_step(model, [[7], list(range(100, 130))], steps=12) <= 1e-5


def test_greedy_generate_equals_full_recompute():
    model = tiny_model()
    prompts = [[5, 6, 7], [9] * 12]
    got = engine.generate(model, prompts, 30)
    for prompt, new in zip(prompts, got):
        ids = list(prompt)
        for _ in range(30):
            ids.append(int(full_logits(model, ids).argmax()))
        assert new == ids[len(prompt):]
    assert list(model.generate(prompts[0], 30)) == got[0]  # GPT.generate is one row of the engine


def test_sampling_is_deterministic_under_a_seed():
    model = tiny_model()
    run = lambda seed: engine.generate(model, [[1, 2], [3, 4, 5]], 20, temperature=1.0, top_k=50, top_p=0.9, seed=seed)
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    kept = lambda z: torch.isfinite(z)[0].tolist()
    assert kept(engine.top_k_filter(logits, 2)) == [True, False, False, False, True]
    probs = logits.softmax(-1)[0]  # 0.644, 0.237, 0.087, 0.032, 0.012 in the order 4, 0, 1, 2, 3
    assert kept(engine.top_p_filter(logits, 0.5)) == [False, False, False, False, True]  # the top token alone reaches 0.5
    p = float(probs[4] + probs[0])  # the top two reach exactly this mass: two tokens, not three
    assert kept(engine.top_p_filter(logits, p - 1e-4)) == [True, False, False, False, True]
    assert kept(engine.top_p_filter(logits, p + 1e-4)) == [True, True, False, False, True]
    assert kept(engine.top_p_filter(logits, 1.0)) == [True] * 5
    # kept logits are untouched, and a draw never leaves the mask
    torch.testing.assert_close(engine.top_k_filter(logits, 2)[0, [0, 4]], logits[0, [0, 4]])
    rng = torch.Generator().manual_seed(0)
    draws = {int(engine.sample_next(logits.repeat(200, 1), 1.0, top_k=3, rng=rng)[i]) for i in range(200)}
    assert draws == {0, 1, 4}
    assert engine.sample_next(logits, 5.0, top_k=1).item() == 4  # top-1 is greedy at any temperature


def test_stops_at_the_stop_token_per_row():
    model = tiny_model()
    prompts = [[5, 6, 7], [9] * 12]
    free = engine.generate(model, prompts, 20)
    stop = free[0][4]  # the fifth token of row 0
    stopped = engine.generate(model, prompts, 20, stop_token=stop)
    for new, old in zip(stopped, free):
        assert new == (old[:old.index(stop)] if stop in old else old)
    assert list(model.generate(prompts[0], 20, stop_token=stop)) == stopped[0]


def test_refusals_are_one_clear_line():
    model = tiny_model()
    with pytest.raises(ValueError, match="sequence_len 64"):
        engine.generate(model, [[1] * 30], 36)  # reads 65 positions
    assert len(engine.generate(model, [[1] * 30], 35)[0]) == 35  # exactly 64: fine
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate(model, [[1], []], 4)
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            engine.generate(model, [[1]], 4, **bad)


def test_training_forward_stays_graph_break_free():
    """The cache argument is a constant None in training: dynamo must trace the loss in one graph."""
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    idx = torch.randint(0, VOCAB, (2, T))
    loss = compiled(idx, idx)
    torch.testing.assert_close(loss, model(idx, idx))


def test_sample_script_prints_the_engines_completions(tmp_path, capsys, tokenizer, tokenizer_dir):
    """scripts/sample.py on a saved checkpoint: each prompt's text is BOS + prompt through the engine."""
    from nanochat.checkpoint import save_checkpoint
    from scripts import sample
    config = GPTConfig.from_depth(1, vocab_size=tokenizer.vocab_size, sequence_len=T, head_dim=32)
    model = GPT.build(config, "cpu", seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    save_checkpoint(str(tmp_path / "checkpoints"), 3, model, {}, {"model_config": config.to_dict(), "args": {}})
    common = ["--run-dir", str(tmp_path), "--tokenizer-dir", tokenizer_dir, "--device-type", "cpu"]
    texts = ["The capital of France is", "Once"]
    rows = sample.main(common + ["--prompt", texts[0], "--prompt", texts[1], "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    want = engine.generate(model, tokenizer.encode(texts, prepend_bos=True), 12, stop_token=tokenizer.bos_token_id)
    assert rows == want and all(len(r) > 0 for r in rows)
    for text, row in zip(texts, rows):
        assert text + tokenizer.decode(row) in out
    assert out.count("--- prompt ") == 2
    with pytest.raises(SystemExit, match="sample: a prompt of .* sequence_len 64"):
        sample.main(common + ["--prompt", texts[0], "--max-new-tokens", "64"])


def test_print_samples_batch_equals_each_prompt_alone(capsys, tokenizer):
    """base_train's samples: one left-padded batch, each row what GPT.generate gives that prompt alone."""
    from scripts.base_train import print_samples
    config = GPTConfig.from_depth(1, vocab_size=tokenizer.vocab_size, sequence_len=T, head_dim=32)
    model = GPT.build(config, "cpu", seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    prompts = ("The capital of France is", "In", "A much longer prompt than the others, to pad them")
    print_samples(model, tokenizer, prompts)
    out = capsys.readouterr().out
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend_bos=True)
        alone = tokenizer.decode(list(model.generate(ids, 16, stop_token=tokenizer.bos_token_id)))
        assert f"sample: {prompt!r} -> {alone!r}" in out
    long_text = "word " * 80  # more than the context: complete() cuts the new tokens instead of refusing
    assert engine.complete(model, tokenizer, ["hi", long_text[:150]], 40)[0] != ""
