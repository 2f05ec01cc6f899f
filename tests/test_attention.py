"""Attention: SDPA backend against a naive reference for every window, GQA shapes, backend choice,
the hub FA3 requested by version, and what SDPA's dense window masks cost (on a faked Hopper GPU)."""

import sys
from dataclasses import replace

import pytest
import torch

from nanochat.attention import (attention, band_mask, constant_under_compile, dense_window_cost, keys_per_query,
                                naive_attention, sdpa_window_notice, select_backend)
from nanochat.gpt import GPTConfig


@pytest.mark.parametrize("window", [1, 3, 8, 17, 32, 64, 1000])
@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_matches_naive(window, n_head, n_kv_head):
    torch.manual_seed(window + n_kv_head)
    B, T, D = 2, 32, 16
    q = torch.randn(B, T, n_head, D)
    k = torch.randn(B, T, n_kv_head, D)
    v = torch.randn(B, T, n_kv_head, D)
    y = attention(q, k, v, window)
    assert y.shape == (B, T, n_head, D)
    torch.testing.assert_close(y, naive_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_window_limits_reach():
    """With window w, output i must not depend on keys at distance >= w, and must depend on w-1."""
    T, w = 16, 4
    q, k, v = (torch.randn(1, T, 2, 8) for _ in range(3))
    y = attention(q, k, v, w)
    k2, v2 = k.clone(), v.clone()
    k2[:, 5], v2[:, 5] = torch.randn(2, 8), torch.randn(2, 8)  # key 5 is visible to queries 5..8 only
    y2 = attention(q, k2, v2, w)
    changed = (y - y2).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed.tolist() == [5 <= i < 5 + w for i in range(T)]


def test_band_mask():
    m = band_mask(5, 2, torch.device("cpu"))
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(m, expected.bool())


def test_constant_under_compile_sets_the_mark_torchs_decorator_sets():
    marked = lambda: None  # noqa: E731
    torch.compiler.assume_constant_result(marked)  # imports torch._dynamo: the cost constant_under_compile avoids
    assert vars(constant_under_compile(lambda: None)) == vars(marked) == {"_dynamo_marked_constant": True}
    assert vars(select_backend) == vars(marked)


def test_backend_on_cpu_is_sdpa_with_reason():
    backend, reason = select_backend(torch.device("cpu"), torch.bfloat16)
    assert backend == "sdpa" and "cpu" in reason


def test_backward_matches_naive():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 8, requires_grad=True) for _ in range(3))
    grads = torch.autograd.grad(attention(q, k, v, 6).square().sum(), (q, k, v))
    ref = torch.autograd.grad(naive_attention(q, k, v, 6).square().sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# -----------------------------------------------------------------------------
# the FlashAttention call convention, against a fake module that records its arguments

class FakeFlash:
    """flash_attn_func as FlashAttention documents it, written independently of nanochat's masks:
    q (B, T, H, D), k/v (B, T, Hkv, D); query i sees key j iff i - left <= j <= i + right (-1: unbounded),
    and with causal=True also j <= i. Records every call."""

    def __init__(self, return_lse=False):
        self.calls, self.return_lse = [], return_lse

    def flash_attn_func(self, q, k, v, causal=False, window_size=(-1, -1)):
        self.calls.append({"shapes": (q.shape, k.shape, v.shape), "causal": causal, "window_size": window_size})
        B, T, H, D = q.shape
        left, right = window_size
        k, v = (t.repeat_interleave(H // t.size(2), dim=2) for t in (k, v))
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        visible = torch.ones(T, T, dtype=torch.bool)
        if left >= 0:
            visible &= j >= i - left
        if right >= 0:
            visible &= j <= i + right
        if causal:
            visible &= j <= i
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / D ** 0.5
        out = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
        return (out, torch.zeros(B, H, T)) if self.return_lse else out


@pytest.fixture
def fake_flash(monkeypatch):
    """attention() routed to the FA3 path with a FakeFlash as the imported module."""
    from nanochat import attention as attn
    fake = FakeFlash()
    monkeypatch.setattr(attn, "_FLASH", [(fake, "fake flash_attn_interface")])
    monkeypatch.setattr(attn, "select_backend", lambda device, dtype: ("fa3", "fake"))
    return fake


@pytest.mark.parametrize("window", [1, 2, 5, 31, 32, 1000])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_flash_call_convention(fake_flash, window, n_kv_head):
    """window counts the keys a query sees, itself included: FlashAttention's (left, right) = (window - 1, 0),
    causal, tensors in (B, T, H, D); a full window is (-1, 0). The result must equal SDPA's."""
    from nanochat.attention import sdpa_attention
    torch.manual_seed(window)
    B, T, H, D = 2, 32, 4, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, n_kv_head, D), torch.randn(B, T, n_kv_head, D)
    y = attention(q, k, v, window)
    call, = fake_flash.calls
    assert call["causal"] is True
    assert call["window_size"] == ((window - 1, 0) if window < T else (-1, 0))
    assert call["shapes"] == (q.shape, k.shape, v.shape)  # (B, T, H, D) as given: no transpose on the way in
    torch.testing.assert_close(y, sdpa_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_flash_output_with_lse_is_unpacked(fake_flash):
    fake_flash.return_lse = True  # some FA3 builds return (out, softmax_lse)
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    y = attention(q, k, v, 3)
    assert isinstance(y, torch.Tensor) and y.shape == q.shape
    torch.testing.assert_close(y, naive_attention(q, k, v, 3), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# the hub FA3 is loaded by version; what SDPA's dense window masks cost

def test_hub_fa3_is_requested_by_version(monkeypatch):
    """kernels >= 0.15 refuses a hub kernel without a version: the fallback would be silent SDPA."""
    import types
    import nanochat.attention as attn
    calls = []
    fake_kernels = types.ModuleType("kernels")
    fake_kernels.get_kernel = lambda repo_id, **kwargs: calls.append((repo_id, kwargs)) or types.SimpleNamespace()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "kernels", fake_kernels)
    module, name = attn._import_flash()
    assert module is not None and calls == [("kernels-community/flash-attn3", {"version": 1})]
    assert "v1" in name


def test_keys_per_query_counts_what_each_kernel_computes():
    T = 16
    for w in (1, 4, 15, 16, 40):
        in_band = band_mask(T, min(w, T), torch.device("cpu")).sum().item() / T  # FA3 skips everything outside
        assert keys_per_query(T, w, "fa3") == pytest.approx(in_band)
    assert keys_per_query(T, 4, "sdpa") == T  # a band mask: every key computed, then masked
    assert keys_per_query(T, T, "sdpa") == keys_per_query(T, T, "fa3") == (T + 1) / 2  # is_causal skips the upper half


def test_dense_window_cost_of_sssl_at_2048():
    # by hand: a 512 window costs 512 - 512*511/4096 = 448.125 keys per query under FA3, a causal
    # 2048 window 1024.5; a 512 band mask under SDPA costs all 2048
    cost = dense_window_cost([512, 512, 512, 2048], 2048, n_head=2, head_dim=64)
    per_key = 12 * 2 * 64
    assert cost.dense_layers == 3 and cost.n_layers == 4
    assert cost.fa3_flops == pytest.approx(per_key * (3 * 448.125 + 1024.5))
    assert cost.sdpa_flops == pytest.approx(per_key * (3 * 2048 + 1024.5))
    assert cost.l_only_flops == pytest.approx(per_key * 4 * 1024.5)
    assert dense_window_cost([64] * 4, 64, 2, 64).dense_layers == 0


def test_sdpa_window_notice_only_on_a_gpu_without_flash(monkeypatch):
    import nanochat.attention as attn
    sssl = GPTConfig(sequence_len=2048, n_layer=4, n_head=2, n_kv_head=2, n_embd=128)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # a faked H100
    monkeypatch.setattr(attn, "_FLASH", [(None, "no FlashAttention (kernels: ImportError)")])
    notice = sdpa_window_notice(cuda, torch.bfloat16, sssl, 1e9)
    assert "3 of 4 layers as dense 2048x2048 masks" in notice and "3.03x its FA3 FLOPs" in notice
    assert "1.75x an all-long pattern (--window-pattern L)" in notice
    assert sdpa_window_notice(cuda, torch.bfloat16, replace(sssl, window_pattern="L"), 1e9) is None
    assert sdpa_window_notice(torch.device("cpu"), torch.bfloat16, sssl, 1e9) is None
    monkeypatch.setattr(attn, "_FLASH", [(object(), "fake FA3")])
    assert sdpa_window_notice(cuda, torch.bfloat16, sssl, 1e9) is None
