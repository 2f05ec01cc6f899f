"""Attention: SDPA backend against a naive reference for every window, GQA shapes, backend choice."""

import pytest
import torch

from nanochat.attention import attention, band_mask, naive_attention, select_backend


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
