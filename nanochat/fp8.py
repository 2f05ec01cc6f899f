"""FP8 training for nanochat's Linear layers: `Float8Linear`, `convert_to_fp8`, `disable_fp8`, `fp8_supported`,
and the opaque matmul op `fp8_scaled_mm`.

Recipe (shared NOTES.md, Systems -> FP8): tensorwise dynamic scaling. Every matmul operand is
cast to fp8 with one fp32 scale computed from its own absolute max at that moment (no amax
history, nothing to keep in sync between steps or ranks):
- forward  out    = x @ w.T   with x, w in e4m3 (3 mantissa bits, max 448)
- backward grad_x = g @ w     with g in e5m2 (2 mantissa bits, max 57344: gradients span
                                more octaves than activations, so range beats precision)
           grad_w = g.T @ x   written straight into the fp32 master weight's gradient
All three run through `torch._scaled_mm`, wrapped in the custom op `fp8_scaled_mm` that
torch.compile treats as opaque: inductor fuses amax, scale and cast, but the operand layouts
_scaled_mm needs are made inside the op, never by inductor-generated fp8 transposes (the
suspects of NaN weight gradients on an Intel CPU, dev/LOG.md 2026-11-30). Only the fp8
copies of x and w and their inverse scales are saved for backward, so a converted layer
keeps 1 byte per activation element instead of 2 (bf16): that is the memory win (~9 GB of
activations at d24).

The speed win exists only on GPUs with fp8 tensor cores (SM >= 89) and only under
torch.compile, which fuses amax, scale and cast into one pass (eager is ~4x slower).
`torch._scaled_mm` also runs on CPU, slower than bf16, so numerics and the compiled graph
are testable anywhere. Evaluation and sampling run inside `disable_fp8(model)`: fp8 adds
~5% noise to accuracy-style metrics (NOTES.md).
"""

from contextlib import contextmanager

import torch

from nanochat.common import rel_err
from nanochat.gpt import Linear

E4M3 = torch.float8_e4m3fn  # forward operands: input and weight
E5M2 = torch.float8_e5m2  # backward operand: the output gradient
# ||fp8 - bf16|| / ||bf16|| bounds for one layer (measured ~0.037 forward, ~0.059 both gradients on
# random and real activations, dev/LOG.md): e4m3 x e4m3 forward; e5m2 gradient x e4m3 operand backward
FP8_REL_TOL = {"out": 0.05, "grad_x": 0.08, "grad_w": 0.08}
AMAX_FLOOR = 1e-12  # an all-zero tensor (zero-initialised c_proj) still gets a finite scale
FP8_MIN_DIM = 128  # smaller matmuls lose more to the scaling passes than fp8 gains (NOTES.md)
FP8_DIM_MULTIPLE = 16  # torch._scaled_mm: mat1's inner dim and both of mat2's dims must divide by 16


def _to_fp8(t, fp8_dtype):
    """(t cast to fp8 with a tensorwise scale, inverse scale): t ~= t_fp8 * inv_scale.

    The scale maps the tensor's amax onto the fp8 format's largest finite value; it is
    computed in fp32, and the clamp catches the amax element landing a rounding step above
    that value (e5m2 would make it inf; e4m3fn has no inf, and casts are not guaranteed to
    saturate on every backend).
    """
    fp8_max = torch.finfo(fp8_dtype).max
    amax = t.abs().amax().float().clamp(min=AMAX_FLOOR)
    scale = fp8_max / amax
    t_fp8 = (t.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return t_fp8.contiguous(), scale.reciprocal()


@torch.library.custom_op("nanochat::fp8_scaled_mm", mutates_args=())
def fp8_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                  out_dtype: torch.dtype, use_fast_accum: bool) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) of fp8 a (M, K) and b (K, N), in out_dtype, via torch._scaled_mm.

    An opaque op for torch.compile: inductor sees only its fake (output shape and dtype), so it
    can neither fuse into nor re-layout the operands. The layouts _scaled_mm needs (a row-major,
    b column-major, CUDA's rule) are made here, by eager copies that are no-ops when the operand
    already has that layout. Why (dev/LOG.md 2026-11-30): under a whole-model
    torch.compile(fullgraph=True) on an Intel Sapphire Rapids CPU the weight gradients of some
    layers came out NaN while eager, and a compiled single layer, were exact; with this op the
    only fp8 tensors inductor writes are the row-major casts in `_to_fp8`.
    """
    a = a.contiguous()
    b = b.t().contiguous().t()
    if a.device.type == "cpu":
        with _onednn_off():
            return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                                    use_fast_accum=use_fast_accum)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)


@contextmanager
def _onednn_off():
    """torch.backends.mkldnn.enabled = False for the body, then back to what it was.

    Why: CPU torch._scaled_mm sends same-dtype fp8 operands (the e4m3 x e4m3 forward) to oneDNN on
    any CPU with AMX-INT8 (Intel Sapphire Rapids and later), and that kernel is ~450x slower than
    torch's own path, which upcasts to fp32 and runs one fp32 matmul (628 ms vs 1.4 ms at
    256x128 @ 128x512, dev/LOG.md 2026-12-02). This flag is the only switch between the two
    (aten Blas.cpp, _scaled_mm_out_cpu: `userEnabledMkldnn() && cpuinfo_has_x86_amx_int8()`).
    Only the enabled flag is touched (torch.backends.mkldnn.flags would also reset deterministic,
    allow_tf32 and fp32_precision). The fp32 matmul inside does not use oneDNN at the default fp32
    precision either way.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


@fp8_scaled_mm.register_fake
def _(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
    return a.new_empty((a.size(0), b.size(1)), dtype=out_dtype)


class _Float8Matmul(torch.autograd.Function):
    """x (M, K) @ weight (N, K).T with all three matmuls of training in fp8.

    Operands are handed to fp8_scaled_mm as transposed views; the op materialises the layouts.
    """

    @staticmethod
    def forward(ctx, x, weight):
        x_fp8, x_inv_scale = _to_fp8(x, E4M3)
        w_fp8, w_inv_scale = _to_fp8(weight, E4M3)
        # Fast accumulation is fine for the output but not for the gradients (Hopper's fp8
        # accumulator keeps fewer bits; the torchao default recipe makes the same split).
        out = fp8_scaled_mm(x_fp8, w_fp8.t(), x_inv_scale, w_inv_scale, x.dtype, True)
        ctx.save_for_backward(x_fp8, x_inv_scale, w_fp8, w_inv_scale)
        ctx.weight_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_fp8, x_inv_scale, w_fp8, w_inv_scale = ctx.saved_tensors
        g_fp8, g_inv_scale = _to_fp8(grad_out, E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_scaled_mm(g_fp8, w_fp8, g_inv_scale, w_inv_scale, grad_out.dtype, False)
        if ctx.needs_input_grad[1]:
            grad_w = fp8_scaled_mm(g_fp8.t(), x_fp8, g_inv_scale, x_inv_scale, ctx.weight_dtype, False)
        return grad_x, grad_w


class Float8Linear(Linear):
    """nanochat `Linear` (bias-free, fp32 master weight) whose matmuls run in fp8; output dtype = input dtype."""

    def __init__(self, in_features, out_features):
        if in_features % FP8_DIM_MULTIPLE or out_features % FP8_DIM_MULTIPLE:
            raise ValueError(f"Float8Linear({in_features}, {out_features}): both dimensions must be multiples of "
                             f"{FP8_DIM_MULTIPLE} for torch._scaled_mm; leave this layer out of convert_to_fp8")
        super().__init__(in_features, out_features)

    @classmethod
    def from_linear(cls, linear):
        """A Float8Linear that shares `linear.weight` (the same Parameter object, no copy)."""
        with torch.device("meta"):  # skip allocating a weight that is replaced at once
            fp8_linear = cls(linear.in_features, linear.out_features)
        fp8_linear.weight = linear.weight
        return fp8_linear

    def forward(self, x):
        x_2d = x.reshape(-1, self.in_features)
        # fp8 backward computes g.T @ x, so the row count becomes an inner dimension of _scaled_mm.
        # Checked here, also on CPU (whose kernel does not check), so a bad shape fails the same everywhere.
        if torch.is_grad_enabled() and x_2d.size(0) % FP8_DIM_MULTIPLE:
            raise ValueError(f"Float8Linear trains only on row counts (batch * sequence) divisible by "
                             f"{FP8_DIM_MULTIPLE}, got {x_2d.size(0)}; run evaluation and sampling inside "
                             f"disable_fp8(model), or pick a batch/sequence length that divides by {FP8_DIM_MULTIPLE}")
        out = _Float8Matmul.apply(x_2d, self.weight)
        return out.view(*x.shape[:-1], self.out_features)


def default_fp8_filter(name, module):
    """Which gpt.Linear layers convert_to_fp8 converts: both dims >= 128 and multiples of 16, not lm_head.

    lm_head is excluded by name: the GPT loss never calls lm_head(x), it reads lm_head.weight
    inside the fused chunked loss (bf16), so a Float8Linear there would be dead code that only
    pretends to be fp8.
    """
    if name.split(".")[-1] == "lm_head":
        return False
    dims = (module.in_features, module.out_features)
    return min(dims) >= FP8_MIN_DIM and all(d % FP8_DIM_MULTIPLE == 0 for d in dims)


def _linear_children(model, cls):
    """(parent, attribute name, qualified name, child) for every child module of exactly type cls."""
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if type(child) is cls:
                found.append((parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child))
    return found


def convert_to_fp8(model, module_filter=None):
    """Swaps eligible gpt.Linear modules of model for Float8Linear in place; returns how many.

    module_filter(qualified_name, module) -> bool picks the layers (default_fp8_filter when
    None). Weights are shared, not copied, so an optimizer built before or after the swap
    holds the very same Parameters.
    """
    module_filter = module_filter or default_fp8_filter
    chosen = [(parent, attr, child) for parent, attr, name, child in _linear_children(model, Linear)
              if module_filter(name, child)]
    for parent, attr, child in chosen:
        setattr(parent, attr, Float8Linear.from_linear(child))
    return len(chosen)


def _plain_linear(fp8_linear):
    with torch.device("meta"):
        linear = Linear(fp8_linear.in_features, fp8_linear.out_features)
    linear.weight = fp8_linear.weight
    return linear


@contextmanager
def disable_fp8(model):
    """Runs the body with every Float8Linear swapped for a plain gpt.Linear sharing its weight.

    The original Float8Linear objects are put back afterwards (also on an exception), so
    parameters, optimizer state and any compiled training graph's guards are untouched.
    """
    swapped = _linear_children(model, Float8Linear)
    for parent, attr, _, fp8_linear in swapped:
        setattr(parent, attr, _plain_linear(fp8_linear))
    try:
        yield model
    finally:
        for parent, attr, _, fp8_linear in swapped:
            setattr(parent, attr, fp8_linear)


def fp8_supported(device):
    """(ok, reason): can `device` train with Float8Linear? fp8 tensor cores need CUDA SM >= 89."""
    device = torch.device(device)
    if device.type == "cpu":
        return True, "CPU: numerics only, slow (torch._scaled_mm runs on CPU, slower than bf16)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 9):
            return True, f"CUDA SM {major}{minor} has fp8 tensor cores"
        return False, (f"CUDA SM {major}{minor} has no fp8 tensor cores (needs SM >= 89: Ada or Hopper); "
                       "train without --fp8")
    return False, f"device type {device.type!r} has no fp8 matmul path in nanochat; train without --fp8"


def _forward_backward(layer, x, grad_out):
    x = x.detach().clone().requires_grad_()
    layer.weight.grad = None
    out = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, layer.weight.grad.clone()


def relative_errors_vs_bf16(linear, x, grad_out):
    """{"out", "grad_x", "grad_w"}: ||fp8 - plain|| / ||plain|| of a Float8Linear sharing `linear`'s weight.

    x and grad_out set the activation dtype (bf16 for the real comparison). Used by the tests and
    by scripts/preflight.py to check the fp8 matmuls of a device against FP8_REL_TOL.
    """
    ref = _forward_backward(linear, x, grad_out)
    got = _forward_backward(Float8Linear.from_linear(linear), x, grad_out)
    linear.weight.grad = None
    return {name: rel_err(g, r) for name, g, r in zip(FP8_REL_TOL, got, ref)}
