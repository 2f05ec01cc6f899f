"""What CUDA requires of each kernel call nanochat makes, checked on any device: one function per call.

The CPU kernels accept calls that CUDA refuses (torch's own meta function for `_scaled_mm` skips
the layout and divisibility checks on CPU), so a CPU test passes a call that would die at step 1
on an H100. Each `check_*` function below states the CUDA rules of one call and raises
`ContractError` naming the rule and its source; `enforced()` wraps the real call sites with them
for the duration of a `with` block (tests, scripts/gpu_check.py), so production pays nothing.

Sources (the rules are paraphrased from these, not copied):
- SCALED_MM: torch/_meta_registrations.py `_check_scaled_mm_sizes` (torch 2.13, the non-CPU branch)
  and aten/src/ATen/native/cuda/Blas.cpp `_scaled_mm_out_cuda` (fp8 dtypes, e5m2 x e5m2 refused by
  cuBLASLt, tensorwise scales fp32 with one element, out_dtype matching the output).
- FA3: flash-attention hopper/flash_api.cpp `mha_fwd` (dtypes fp16/bf16/e4m3, k and v of q's dtype,
  stride(-1) == 1, head dim <= 256 and a multiple of 8 (16 in fp8), heads of q divisible by heads of
  k/v, window_size_left/right with -1 = unbounded and causal forcing right = 0) and
  hopper/flash_attn_interface.py (layout (B, T, H, D), `window_size=(left, right)`, the forward and
  backward as torch custom ops; FP8 is forward only). The HF hub build kernels-community/flash-attn3
  exposes the same `flash_attn_func`.
- SDPA: aten/src/ATen/native/transformers/cuda/sdp_utils.cpp `can_use_flash_attention` /
  `can_use_mem_efficient_attention` / `select_sdp_backend` (priority flash > efficient > math).
- NCCL: torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp `_reduce_scatter_base` / `_allgather_base`
  (same dtype in and out, input numel == output numel x world size for reduce-scatter and the
  reverse for all-gather, no float8 reductions, dense contiguous CUDA tensors) and the
  torch.distributed docs of reduce_scatter_tensor / all_gather_into_tensor.
"""

from collections import Counter
from contextlib import contextmanager

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_MM_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the outputs cuBLASLt gives fp8 inputs without a result scale
SCALED_MM_DIM_MULTIPLE = 16
FA3_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
FA3_MAX_HEAD_DIM = 256
SDPA_FLASH_MAX_HEAD_DIM = 256

SOURCE_SCALED_MM = "torch/_meta_registrations.py _check_scaled_mm_sizes + aten/src/ATen/native/cuda/Blas.cpp _scaled_mm_out_cuda"
SOURCE_FA3 = "flash-attention hopper/flash_api.cpp mha_fwd/mha_bwd + hopper/flash_attn_interface.py"
SOURCE_SDPA = "aten/src/ATen/native/transformers/cuda/sdp_utils.cpp can_use_flash_attention / can_use_mem_efficient_attention"
SOURCE_NCCL = "torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp _reduce_scatter_base/_allgather_base, check_gpu_single_tensor"


class ContractError(ValueError):
    """A call CUDA would refuse (or run on a slow fallback): 'RULE: detail [source]'; `.rule` is the rule alone."""

    def __init__(self, rule, detail, source):
        super().__init__(f"{rule}: {detail} [{source}]")
        self.rule = rule


def _require(ok, rule, detail, source):
    if not ok:
        raise ContractError(rule, detail, source)


def _dt(dtype):
    return str(dtype).removeprefix("torch.")


# -----------------------------------------------------------------------------
# torch._scaled_mm (nanochat/fp8.py fp8_scaled_mm)

def is_row_major(t):
    return t.stride(1) == 1 and t.stride(0) > t.stride(1)


def is_col_major(t):
    return t.stride(0) == 1 and t.stride(1) > 1


def check_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
    """torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=...) with tensorwise scales, as CUDA requires it."""
    s = SOURCE_SCALED_MM
    _require(a.dim() == 2 and b.dim() == 2, "scaled_mm operands are matrices", f"got {a.dim()}-D and {b.dim()}-D", s)
    _require(a.size(1) == b.size(0), "scaled_mm inner dimensions agree", f"a {tuple(a.shape)} @ b {tuple(b.shape)}", s)
    _require(a.dtype in FP8_DTYPES and b.dtype in FP8_DTYPES, "scaled_mm operands are fp8 (e4m3fn or e5m2)",
             f"got {_dt(a.dtype)} and {_dt(b.dtype)}", s)
    _require(not (a.dtype == b.dtype == torch.float8_e5m2), "scaled_mm refuses e5m2 x e5m2 (cuBLASLt)",
             "cast one operand to e4m3fn", s)
    _require(is_row_major(a) or 0 in a.shape, "scaled_mm first operand is row-major",
             f"a {tuple(a.shape)} has strides {a.stride()}: call .contiguous()", s)
    _require(is_col_major(b) or 0 in b.shape, "scaled_mm second operand is column-major",
             f"b {tuple(b.shape)} has strides {b.stride()}: pass b.t().contiguous().t()", s)
    m = SCALED_MM_DIM_MULTIPLE
    _require(a.size(1) % m == 0, f"scaled_mm inner dimension divisible by {m}", f"a is {tuple(a.shape)}", s)
    _require(b.size(0) % m == 0 and b.size(1) % m == 0, f"scaled_mm second operand's dimensions divisible by {m}",
             f"b is {tuple(b.shape)}", s)
    for name, scale in (("scale_a", scale_a), ("scale_b", scale_b)):
        _require(scale.dtype == torch.float32, f"scaled_mm tensorwise {name} is fp32", f"got {_dt(scale.dtype)}", s)
        _require(scale.numel() == 1, f"scaled_mm tensorwise {name} has one element", f"got shape {tuple(scale.shape)}", s)
        _require(scale.device == a.device, f"scaled_mm {name} is on the operands' device",
                 f"{name} on {scale.device}, a on {a.device}", s)
    _require(b.device == a.device, "scaled_mm operands share a device", f"{a.device} vs {b.device}", s)
    _require(out_dtype in SCALED_MM_OUT_DTYPES, "scaled_mm out_dtype is bf16, fp16 or fp32",
             f"got {out_dtype} (an fp8 output needs scale_result)", s)
    _require(isinstance(use_fast_accum, bool), "scaled_mm use_fast_accum is a bool", f"got {use_fast_accum!r}", s)


# -----------------------------------------------------------------------------
# FlashAttention 3 (nanochat/attention.py flash_attention)

def fa3_window(window, seq_len):
    """nanochat's window (keys seen per query, itself included) as FA3's (left, right) with causal=True."""
    return (-1 if window >= seq_len else window - 1, 0)


def check_fa3_window(window_size, causal):
    s = SOURCE_FA3
    _require(isinstance(window_size, (tuple, list)) and len(window_size) == 2, "FA3 window_size is a (left, right) pair",
             f"got {window_size!r}", s)
    left, right = window_size
    _require(all(isinstance(w, int) and not isinstance(w, bool) for w in (left, right)), "FA3 window sizes are ints",
             f"got {window_size!r}", s)
    _require(left >= -1 and right >= -1, "FA3 window sizes are >= -1 (-1: unbounded)", f"got {window_size!r}", s)
    _require(not causal or right in (0, -1), "FA3 causal=True sets window right to 0",
             f"window_size {window_size!r} asks for {right} future keys that causal silently drops", s)


def check_fa3(q, k, v, causal=True, window_size=(-1, -1), requires_grad=None):
    """flash_attn_func(q, k, v, causal=..., window_size=(left, right)) on (B, T, H, D) tensors, as FA3 requires it."""
    s = SOURCE_FA3
    _require(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "FA3 takes (B, T, H, D) tensors",
             f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}", s)
    _require(q.dtype in FA3_DTYPES, "FA3 dtype is fp16, bf16 or fp8 e4m3", f"q is {_dt(q.dtype)}", s)
    _require(k.dtype == q.dtype and v.dtype == q.dtype, "FA3 k and v have q's dtype",
             f"q {_dt(q.dtype)}, k {_dt(k.dtype)}, v {_dt(v.dtype)}", s)
    _require(k.device == q.device and v.device == q.device, "FA3 q, k, v share a device", f"{q.device}, {k.device}, {v.device}", s)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require(t.stride(-1) == 1, "FA3 inputs have a contiguous last dimension",
                 f"{name} {tuple(t.shape)} has strides {t.stride()}", s)
    (B, T, H, D), (Bk, Tk, Hk, Dk) = q.shape, k.shape
    _require(Bk == B and tuple(v.shape[:3]) == (Bk, Tk, Hk), "FA3 batch and key/value shapes agree",
             f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: (B, T, H, D), not (B, H, T, D)?", s)
    _require(Tk == T or not causal, "FA3 causal self-attention has q and k of one length",
             f"q has {T} positions, k {Tk}: FA3 aligns the causal mask bottom-right; (B, H, T, D) passed for (B, T, H, D)?", s)
    _require(Dk == D and v.size(-1) == D, "FA3 q, k, v share the head dim here", f"{D}, {Dk}, {v.size(-1)}", s)
    _require(D <= FA3_MAX_HEAD_DIM, f"FA3 head dim <= {FA3_MAX_HEAD_DIM}", f"got {D}", s)
    align = 16 if q.dtype == torch.float8_e4m3fn else 8
    _require(D % align == 0, f"FA3 head dim is a multiple of {align}", f"got {D}", s)
    _require(H % Hk == 0, "FA3 heads of q divisible by heads of k/v (GQA)", f"{H} query heads, {Hk} key/value heads", s)
    grad = requires_grad if requires_grad is not None else any(t.requires_grad for t in (q, k, v))
    _require(not (grad and q.dtype == torch.float8_e4m3fn), "FA3 fp8 is forward only", "no backward in e4m3", s)
    check_fa3_window(window_size, causal)


# -----------------------------------------------------------------------------
# SDPA on CUDA: which fused backend a call can use (nanochat/attention.py sdpa_attention)

def sdpa_fused_backends(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """{"flash": why-not or None, "efficient": why-not or None} for (B, H, T, D) inputs on a Hopper GPU.

    A call with neither backend runs on the math fallback, which materialises the (B, H, T, T)
    scores in memory (at T 2048, 32 heads and batch 32 that is 8 GiB per layer in bf16)."""
    D, Hq, Hk = q.size(-1), q.size(-3), k.size(-3)
    strided = next((n for n, t in (("q", q), ("k", k), ("v", v)) if t.stride(-1) != 1), None)
    flash = efficient = None
    if q.dtype not in (torch.float16, torch.bfloat16):
        flash = f"dtype {_dt(q.dtype)} (fp16/bf16 only)"
    elif attn_mask is not None:
        flash = "an attn_mask (flash takes is_causal only)"
    elif D > SDPA_FLASH_MAX_HEAD_DIM or D % 8:
        flash = f"head dim {D} (<= 256, multiple of 8)"
    elif strided:
        flash = f"{strided}'s last dimension is strided"
    elif is_causal and q.size(-2) != k.size(-2):
        flash = "is_causal with different query and key lengths"
    elif Hq != Hk and not enable_gqa:
        flash = f"{Hq} query heads vs {Hk} key heads without enable_gqa"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        efficient = f"dtype {_dt(q.dtype)}"
    elif D % (8 if q.dtype != torch.float32 else 4):
        efficient = f"head dim {D} not aligned"
    elif strided:
        efficient = f"{strided}'s last dimension is strided"
    elif Hq != Hk:
        efficient = "grouped-query heads (efficient attention needs equal head counts)"
    return {"flash": flash, "efficient": efficient}


def check_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """A CUDA SDPA call in bf16/fp16 must reach a fused backend, never the math fallback."""
    why_not = sdpa_fused_backends(q, k, v, attn_mask, is_causal, enable_gqa)
    _require(why_not["flash"] is None or why_not["efficient"] is None, "SDPA reaches flash or efficient attention on CUDA",
             f"flash refused ({why_not['flash']}), efficient refused ({why_not['efficient']}): the math fallback "
             f"materialises {tuple(q.shape[:2]) + (q.size(-2), k.size(-2))} scores", SOURCE_SDPA)


# -----------------------------------------------------------------------------
# NCCL collectives as ZeRO-2 calls them (nanochat/optim.py)

def _check_nccl_tensor(t, name):
    _require(t.is_contiguous(), "NCCL tensors are dense and contiguous", f"{name} {tuple(t.shape)} has strides {t.stride()}",
             SOURCE_NCCL)


def check_reduce_scatter(output, input, world_size):
    """reduce_scatter_tensor(output, input): input holds world_size equal shards of output's size."""
    _check_nccl_tensor(output, "output")
    _check_nccl_tensor(input, "input")
    _require(input.dtype == output.dtype, "reduce_scatter input and output share a dtype",
             f"{_dt(input.dtype)} vs {_dt(output.dtype)}", SOURCE_NCCL)
    _require(input.dtype not in FP8_DTYPES, "NCCL reduces no float8", f"got {_dt(input.dtype)}", SOURCE_NCCL)
    _require(input.numel() == output.numel() * world_size, "reduce_scatter input is world_size equal shards of the output",
             f"input {tuple(input.shape)}, output {tuple(output.shape)}, world size {world_size}", SOURCE_NCCL)
    _require(input.device == output.device, "reduce_scatter tensors share a device", f"{input.device} vs {output.device}",
             SOURCE_NCCL)


def check_all_gather(output, input, world_size):
    """all_gather_into_tensor(output, input): output holds world_size shards of input's size."""
    _check_nccl_tensor(output, "output")
    _check_nccl_tensor(input, "input")
    _require(input.dtype == output.dtype, "all_gather input and output share a dtype",
             f"{_dt(input.dtype)} vs {_dt(output.dtype)}", SOURCE_NCCL)
    _require(output.numel() == input.numel() * world_size, "all_gather output is world_size equal shards of the input",
             f"input {tuple(input.shape)}, output {tuple(output.shape)}, world size {world_size}", SOURCE_NCCL)
    _require(input.device == output.device, "all_gather tensors share a device", f"{input.device} vs {output.device}",
             SOURCE_NCCL)


def check_all_reduce(tensor):
    _check_nccl_tensor(tensor, "tensor")
    _require(tensor.dtype not in FP8_DTYPES, "NCCL reduces no float8", f"got {_dt(tensor.dtype)}", SOURCE_NCCL)


# -----------------------------------------------------------------------------
# a reference FA3 with FA3's calling convention, for devices without one (CPU tests)

def _fa3_band_probs(q, k, left, right):
    """(softmax probabilities (B, H, T, T) in fp32, k repeated to q's heads) under FA3's causal window."""
    B, T, H, D = q.shape
    k = k.repeat_interleave(H // k.size(2), dim=2).float()
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    visible = (j <= i) & ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k) / D ** 0.5
    return scores.masked_fill(~visible, float("-inf")).softmax(-1), k


def fa3_band_attention(q, k, v, left, right):
    """Exact causal attention with FA3's window semantics, (B, T, H, D) in and out, math in fp32."""
    probs, _ = _fa3_band_probs(q, k, left, right)
    v = v.repeat_interleave(q.size(2) // v.size(2), dim=2).float()
    return torch.einsum("bhts,bshd->bthd", probs, v).to(q.dtype)


def fa3_band_attention_grads(dout, q, k, v, left, right):
    """(dq, dk, dv) of fa3_band_attention, written out (a custom op's body runs without autograd)."""
    H, Hk, D = q.size(2), k.size(2), q.size(-1)
    probs, k_rep = _fa3_band_probs(q, k, left, right)
    v_rep = v.repeat_interleave(H // Hk, dim=2).float()
    do = dout.float()
    dv = torch.einsum("bhts,bthd->bshd", probs, do)
    dp = torch.einsum("bthd,bshd->bhts", do, v_rep)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True)) / D ** 0.5
    dq = torch.einsum("bhts,bshd->bthd", ds, k_rep)
    dk = torch.einsum("bhts,bthd->bshd", ds, q.float())
    fold = lambda g: g.unflatten(2, (Hk, H // Hk)).sum(3)  # GQA: a key head's gradient sums over its query heads
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@torch.library.custom_op("nanochat_contracts::fa3_reference_fwd", mutates_args=())
def _fa3_reference_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int) -> torch.Tensor:
    check_fa3(q, k, v, causal=True, window_size=(left, right), requires_grad=False)
    calls["fa3"] += 1
    return fa3_band_attention(q, k, v, left, right)


@_fa3_reference_fwd.register_fake
def _(q, k, v, left, right):
    return torch.empty_like(q)


@torch.library.custom_op("nanochat_contracts::fa3_reference_bwd", mutates_args=())
def _fa3_reference_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int,
                       right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_fa3(q, k, v, causal=True, window_size=(left, right), requires_grad=False)
    _require(dout.dtype == q.dtype and dout.stride(-1) == 1, "FA3 backward dout has q's dtype and a contiguous last dim",
             f"dout {_dt(dout.dtype)} strides {dout.stride()}", SOURCE_FA3)
    calls["fa3_backward"] += 1
    return fa3_band_attention_grads(dout, q, k, v, left, right)


@_fa3_reference_bwd.register_fake
def _(dout, q, k, v, left, right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa3_setup_context(ctx, inputs, output):
    q, k, v, left, right = inputs
    ctx.save_for_backward(q, k, v)
    ctx.window = (left, right)


def _fa3_backward(ctx, dout):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = _fa3_reference_bwd(dout.contiguous(), q, k, v, *ctx.window)
    return dq, dk, dv, None, None


_fa3_reference_fwd.register_autograd(_fa3_backward, setup_context=_fa3_setup_context)


class ReferenceFA3:
    """A module with FA3's `flash_attn_func` (as nanochat calls it) that checks the FA3 contract and computes exactly.

    Both passes are torch custom ops, like the real FA3's (hopper/flash_attn_interface.py), so under
    torch.compile they run as opaque calls on the tensors inductor really hands them."""

    @staticmethod
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **unused):
        _require(softmax_scale in (None, q.size(-1) ** -0.5), "reference FA3 uses the default 1/sqrt(D) scale",
                 f"got {softmax_scale}", SOURCE_FA3)
        _require(causal, "nanochat calls FA3 with causal=True", "got causal=False", SOURCE_FA3)
        check_fa3_window(window_size, causal)
        return _fa3_reference_fwd(q, k, v, int(window_size[0]), int(window_size[1]))


class CheckedFA3:
    """Wraps a real FA3 module: every flash_attn_func call is checked against the contract first."""

    def __init__(self, inner):
        self.inner = inner

    def flash_attn_func(self, q, k, v, *args, causal=False, window_size=(-1, -1), **kwargs):
        check_fa3(q, k, v, causal=causal, window_size=window_size)
        calls["fa3"] += 1
        return self.inner.flash_attn_func(q, k, v, *args, causal=causal, window_size=window_size, **kwargs)


# -----------------------------------------------------------------------------
# enforcing the contracts at the real call sites

calls = Counter()  # checked calls by name since the last enforced() began (eager calls; see enforced())


def _checked_scaled_mm(real):
    def scaled_mm(a, b, scale_a=None, scale_b=None, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        check_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum)
        calls["scaled_mm"] += 1
        return real(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, scale_result=scale_result, out_dtype=out_dtype,
                     use_fast_accum=use_fast_accum)
    return scaled_mm


def _checked_sdpa(real):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        check_sdpa(query, key, value, attn_mask, is_causal, enable_gqa)
        calls["sdpa"] += 1
        return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
    return sdpa


def _world_size(group):
    import torch.distributed as dist
    return dist.get_world_size(group)


def _checked_reduce_scatter(real):
    def reduce_scatter(output, input, *args, **kwargs):
        check_reduce_scatter(output, input, _world_size(kwargs.get("group")))
        calls["reduce_scatter"] += 1
        return real(output, input, *args, **kwargs)
    return reduce_scatter


def _checked_all_gather(real):
    def all_gather(output, input, *args, **kwargs):
        check_all_gather(output, input, _world_size(kwargs.get("group")))
        calls["all_gather"] += 1
        return real(output, input, *args, **kwargs)
    return all_gather


def _checked_all_reduce(real):
    def all_reduce(tensor, *args, **kwargs):
        check_all_reduce(tensor)
        calls["all_reduce"] += 1
        return real(tensor, *args, **kwargs)
    return all_reduce


@contextmanager
def enforced(fa3="real", sdpa=True):
    """Within the block every call nanochat makes to _scaled_mm, FA3, SDPA and the ZeRO-2 collectives is checked
    against its CUDA contract; yields the `calls` counter (reset on entry).

    fa3: "real" wraps the FA3 module attention.py loaded (if any) in CheckedFA3; "reference" makes attention()
    take the FA3 path on any device with ReferenceFA3 (checks + exact math); None leaves attention alone.
    sdpa: check F.scaled_dot_product_attention calls (bf16/fp16 calls must reach a fused CUDA backend).

    Under torch.compile: _scaled_mm and FA3 run inside torch custom ops (nanochat::fp8_scaled_mm, FA3's own or
    the reference's), whose bodies execute eagerly on the real tensors, so their checks see every call at run
    time. SDPA is traced by dynamo: its check runs once per compiled graph, on the traced (fake) tensors.
    Compiled graphs built before entering keep the functions they traced: enter before compiling.
    """
    import torch.nn.functional as F
    from nanochat import attention, optim

    calls.clear()
    saved = [(torch, "_scaled_mm", torch._scaled_mm), (optim, "reduce_scatter_single", optim.reduce_scatter_single),
             (optim, "all_gather_single", optim.all_gather_single), (optim.dist, "all_reduce", optim.dist.all_reduce),
             (F, "scaled_dot_product_attention", F.scaled_dot_product_attention),
             (attention, "select_backend", attention.select_backend), (attention, "_FLASH", attention._FLASH)]
    torch._scaled_mm = _checked_scaled_mm(torch._scaled_mm)
    optim.reduce_scatter_single = _checked_reduce_scatter(optim.reduce_scatter_single)
    optim.all_gather_single = _checked_all_gather(optim.all_gather_single)
    optim.dist.all_reduce = _checked_all_reduce(optim.dist.all_reduce)
    if sdpa:
        F.scaled_dot_product_attention = _checked_sdpa(F.scaled_dot_product_attention)
    if fa3 == "reference":
        attention._FLASH = [(ReferenceFA3, "reference FA3 (nanochat.contracts)")]
        attention.select_backend = lambda device, dtype: (
            ("fa3", "reference FA3") if dtype in (torch.bfloat16, torch.float16) else ("sdpa", "SDPA: fp32"))
    elif fa3 == "real":
        module, name = attention._flash_module() if torch.cuda.is_available() else (None, "")
        if module is not None:
            attention._FLASH = [(CheckedFA3(module), name)]
    try:
        yield calls
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
