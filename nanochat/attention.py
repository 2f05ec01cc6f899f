"""Causal self-attention with a sliding window: one entry point, two backends.

`attention(q, k, v, window)` takes q of shape (B, T, H, D) and k, v of shape (B, T, Hkv, D)
(grouped-query attention when Hkv < H) and returns (B, T, H, D). `window` counts the keys
each query sees, itself included: query i attends to keys j with i - window < j <= i, so
window >= T is plain causal attention.

Backends:
- FA3 (`flash_attn_interface`, the HF `kernels` hub build, or FA2's `flash_attn`) when the tensors are on a
  CUDA Hopper GPU (SM 9.x) in bf16/fp16 and the module imports. Sliding windows are native
  there and really skip the masked blocks.
- PyTorch SDPA everywhere else: plain `is_causal` for full windows, and a boolean band mask
  for sliding windows, built once per (T, window, device) and cached.
Both compute exactly the same function; tests compare them against a naive reference.

The two are not the same speed: a band mask makes SDPA compute every key of every query and
mask most of them away. `dense_window_cost` says what that costs a pattern of windows, and
`sdpa_window_notice` is the one line base_train and preflight print when a GPU run pays it.
"""

from collections import namedtuple
from functools import lru_cache

import torch
import torch.nn.functional as F


_FLASH = []  # memo of _flash_module(): an import attempt is made once per process
# The hub's FA3 and the major version we load. Kernel versions are branches v<N> of the repo;
# kernels >= 0.15 refuses to load a hub kernel without a version. Version 1 ships Torch stable-ABI
# builds (torch >= 2.9, CUDA 12.6 / 12.8 / 13.0) besides per-torch ones; scripts/setup_venv.sh
# installs a torch that one of them fits (dev/LOG.md, "which torch on a GPU node").
FA3_HUB_REPO, FA3_HUB_VERSION = "kernels-community/flash-attn3", 1


def _flash_module():
    """(module, name) of an importable FlashAttention with a window_size argument, or (None, why)."""
    if not _FLASH:
        _FLASH.append(_import_flash())
    return _FLASH[0]


def _import_flash():
    """Only called on a CUDA Hopper GPU in bf16/fp16 (see select_backend)."""
    try:
        import flash_attn_interface  # FA3 built from flash-attention's hopper/ directory
        return flash_attn_interface, "flash_attn_interface (FA3)"
    except ImportError:
        pass
    try:
        from kernels import get_kernel  # prebuilt FA3 from the HF hub (pip install kernels): no CUDA build
        return get_kernel(FA3_HUB_REPO, version=FA3_HUB_VERSION), f"{FA3_HUB_REPO} v{FA3_HUB_VERSION} (FA3 via kernels)"
    except Exception as e:  # not installed, offline, or no build for this torch/CUDA: fall through, keep why
        kernels_failure = f"kernels: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    try:
        import flash_attn  # FA2 build; also has flash_attn_func(..., window_size=)
        return flash_attn, f"flash_attn (FA2; FA3 unavailable, {kernels_failure})"
    except ImportError:
        return None, f"no FlashAttention ({kernels_failure}): pip install kernels (prebuilt FA3) or 'nanochat[gpu]'"


def constant_under_compile(fn):
    """The mark torch.compiler.assume_constant_result sets (dynamo calls fn once while tracing and keeps the
    result), without importing torch._dynamo: that import is ~1.9 s of every eager process's start-up on a
    2-core CPU (dev/LOG.md 2026-12-03). tests/test_attention.py checks it is the mark torch's decorator sets."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def select_backend(device, dtype):
    """Returns (backend, reason) for tensors of this device and dtype; backend is 'fa3' or 'sdpa'."""
    if device.type != "cuda":
        return "sdpa", f"SDPA: device is {device.type}, FlashAttention needs CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return "sdpa", f"SDPA: GPU is SM {major}{minor}, FA3 kernels are built for Hopper (SM 90)"
    if dtype not in (torch.bfloat16, torch.float16):
        return "sdpa", f"SDPA: FlashAttention needs bf16/fp16, activations are {dtype}"
    module, name = _flash_module()
    if module is None:
        return "sdpa", f"SDPA: {name}"
    return "fa3", f"FlashAttention: {name} on SM {major}{minor} in {dtype}"


def band_mask(seq_len, window, device):
    """Boolean (T, T) mask, True where query i may attend key j: i - window < j <= i."""
    pos = torch.arange(seq_len, device=device)
    distance = pos[:, None] - pos[None, :]
    return (distance >= 0) & (distance < window)


cached_band_mask = lru_cache(maxsize=64)(band_mask)


def sdpa_attention(q, k, v, window):
    T = q.size(1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, H, T, D)
    gqa = k.size(1) != q.size(1)
    if window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        # eager: build the mask once per shape; compiled: T and window are constants, so the
        # mask is folded into the graph (dynamo would bypass an lru_cache anyway)
        mask = band_mask(T, window, q.device) if torch.compiler.is_compiling() else cached_band_mask(T, window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def flash_attention(q, k, v, window):
    module, _ = _flash_module()
    T = q.size(1)
    # FlashAttention's window_size is (left, right) in key distance; -1 means unbounded
    left = -1 if window >= T else window - 1
    out = module.flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE


# -----------------------------------------------------------------------------
# what the SDPA fallback costs a sliding-window pattern

WindowCost = namedtuple("WindowCost", "dense_layers n_layers seq_len sdpa_flops fa3_flops l_only_flops")


def keys_per_query(seq_len, window, backend):
    """Mean number of keys whose scores a kernel computes per query, over the T positions.

    FA3 skips every block outside the causal band, so query i costs min(i + 1, window) keys.
    SDPA with is_causal (a full window) skips the upper triangle the same way; SDPA with a band
    mask cannot skip anything and computes all T keys before masking."""
    w = min(window, seq_len)
    if backend == "sdpa" and w < seq_len:
        return float(seq_len)
    return w - w * (w - 1) / (2 * seq_len)


def dense_window_cost(window_sizes, seq_len, n_head, head_dim):
    """Attention FLOPs per token (forward + backward) of a window pattern under SDPA, under FA3 and
    under SDPA with every layer long (--window-pattern L), as the kernels really execute them."""
    flops_per_key = 12 * n_head * head_dim  # QK^T and PV: 2 matmuls x 2 FLOPs per MAC, x3 with backward
    total = lambda windows, backend: flops_per_key * sum(keys_per_query(seq_len, w, backend) for w in windows)
    return WindowCost(dense_layers=sum(w < seq_len for w in window_sizes), n_layers=len(window_sizes), seq_len=seq_len,
                      sdpa_flops=total(window_sizes, "sdpa"), fa3_flops=total(window_sizes, "fa3"),
                      l_only_flops=total([seq_len] * len(window_sizes), "sdpa"))


def sdpa_window_notice(device, dtype, config, flops_per_token):
    """One line for a CUDA run whose sliding windows SDPA computes as dense masks, else None.

    flops_per_token: the model's own estimate (GPT.estimate_flops), to put the extra in proportion."""
    if device.type != "cuda" or select_backend(device, dtype)[0] == "fa3":
        return None
    cost = dense_window_cost(config.window_sizes(), config.sequence_len, config.n_head, config.head_dim)
    if cost.dense_layers == 0:
        return None
    T = cost.seq_len
    return (f"SDPA runs the sliding windows of {cost.dense_layers} of {cost.n_layers} layers as dense "
            f"{T}x{T} masks: attention costs {cost.sdpa_flops / cost.fa3_flops:.2f}x its FA3 FLOPs "
            f"(+{(cost.sdpa_flops - cost.fa3_flops) / flops_per_token:.0%} of the model's {flops_per_token:.3g} FLOPs per token) "
            f"and {cost.sdpa_flops / cost.l_only_flops:.2f}x an all-long pattern (--window-pattern L) under SDPA")


def attention(q, k, v, window):
    backend, _ = select_backend(q.device, q.dtype)
    if backend == "fa3":
        return flash_attention(q, k, v, window)
    return sdpa_attention(q, k, v, window)


def naive_attention(q, k, v, window):
    """Reference implementation (explicit softmax over a band mask) used by tests and preflight."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / D ** 0.5
    scores = scores.masked_fill(~band_mask(T, min(window, T), q.device), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.float()).to(q.dtype)
