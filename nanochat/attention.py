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
"""

from functools import lru_cache

import torch
import torch.nn.functional as F


_FLASH = []  # memo of _flash_module(): an import attempt is made once per process


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
        return get_kernel("kernels-community/flash-attn3"), "kernels-community/flash-attn3 (FA3 via kernels)"
    except Exception as e:  # not installed, offline, or no build for this torch/CUDA: fall through, keep why
        kernels_failure = f"kernels: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    try:
        import flash_attn  # FA2 build; also has flash_attn_func(..., window_size=)
        return flash_attn, f"flash_attn (FA2; FA3 unavailable, {kernels_failure})"
    except ImportError:
        return None, f"no FlashAttention ({kernels_failure}): pip install kernels (prebuilt FA3) or 'nanochat[gpu]'"


@torch.compiler.assume_constant_result
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
