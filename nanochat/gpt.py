"""The GPT: configuration, layers, forward pass with a memory-lean loss, parameter and FLOP counts.

Architecture (facts in shared NOTES.md, "Model"):
- token embedding -> parameter-free RMSNorm -> smear (a gated share of the previous token's
  embedding) -> n_layer blocks -> backout (minus a learned share of the mid-depth residual)
  -> RMSNorm -> untied lm_head
- each block: x = lambda_resid[i] * x + lambda_x0[i] * x0, then pre-norm attention and a
  ReLU^2 MLP (4x hidden), no biases anywhere
- attention: rotary (base 100 000), parameter-free QK-norm, grouped-query heads, a
  sliding-window pattern ("SSSL": short = a quarter of the context rounded up to 128,
  the last layer always long), q and k scaled by 1.2 after the norm, and value embeddings
  on alternating layers (the last one included) mixed into v through an input-dependent gate
  (3 * sigmoid over 12 channels)
- smear, backout, q/k scale and the 3x gate are the reference's July record recipe (shared
  RECIPE.md, "Architecture"); dev/LOG.md has what each measured here
- logits soft-capped at 15 * tanh(z / 15); vocab padded to a multiple of 64

Precision: master weights are fp32 (token and value embeddings bf16 when the compute dtype is
bf16, as in the reference); `Linear` casts its weight to the activation dtype and
activations run in `COMPUTE_DTYPE` (no autocast). The training loss never materialises the
(B*T x vocab) logits: `fused_head_cross_entropy` walks the rows in chunks and computes the
gradients of each chunk during the forward pass.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import attention
from nanochat.common import COMPUTE_DTYPE
from nanochat.scaling import VE_GATE_CHANNELS, model_shape

ROTARY_BASE = 100_000
VOCAB_MULTIPLE = 64
QK_SCALE = 1.2  # RECIPE: q and k x1.2 after RoPE + QK-norm (R1 1.15, R2 1.2): sharper attention than unit-norm q.k
C_FC_INIT_SCALE = 0.4  # RECIPE R2: c_fc's uniform init at 0.4x the 1/sqrt(fan_in) bound (R1 0.5x); see init_weights
SMEAR_CHANNELS = 24  # the smear gate reads this many leading channels of the current token's embedding
LOSS_CHUNK_ELEMENTS = 2**25  # logits per loss chunk: 1024 rows at vocab 32768 = 128 MiB in fp32
FP16_SAFE_MAX = 60_000  # headroom under fp16's largest finite value, 65504


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"
    short_window: int = 0  # 0: a quarter of sequence_len rounded up to a multiple of 128
    softcap: float = 15.0
    norm_gains: bool = False  # selective RMSNorm scales (PR #830): learnable gains on the pre-MLP and final norms

    @classmethod
    def from_depth(cls, depth, vocab_size=32768, sequence_len=2048, aspect_ratio=64, head_dim=128, **overrides):
        """The one dial: width = depth * aspect_ratio rounded up to a multiple of head_dim."""
        n_embd, n_head = model_shape(depth, aspect_ratio, head_dim)
        fields = dict(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                      n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
        return cls(**{**fields, **overrides})

    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd={self.n_embd} must divide into n_head={self.n_head} heads, "
                             f"and n_head into n_kv_head={self.n_kv_head} groups")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern {self.window_pattern!r} must be a non-empty string of S and L")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def window_sizes(self):
        """Keys visible to each query, per layer: the pattern tiled over depth, last layer long."""
        T = self.sequence_len
        # RECIPE: S = -(-T//4 // 128) * 128, a quarter of T rounded up to 128 (512 at T=2048)
        short = self.short_window or min(T, -(-(T // 4) // 128) * 128)
        pattern = self.window_pattern.upper()
        sizes = [T if pattern[i % len(pattern)] == "L" else short for i in range(self.n_layer)]
        sizes[-1] = T
        return sizes

    def has_value_embed(self, layer_idx):
        return (self.n_layer - 1 - layer_idx) % 2 == 0

    def to_dict(self):
        return asdict(self)


class Linear(nn.Linear):
    """Bias-free Linear with an fp32 master weight cast to the input's dtype at use (no autocast)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    """Rotates channel pairs (i, i + D/2) of x (B, T, H, D) by position-dependent angles."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def rotary_tables(seq_len, head_dim, device, base=ROTARY_BASE):
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, has_value_embed):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, config.n_embd)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_value_embed else None

    def forward(self, x, value_embed, cos, sin, window, kv_cache=None):
        """kv_cache: an engine.LayerCache (cached decoding: x are the next tokens); None is the training path."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embed is not None:
            # gate in (0, 3) (RECIPE R1: 3 * sigmoid, was 2x): the token's value embedding is added
            # to v with a per-head, input-dependent weight; the wider range lets a head lean on it harder
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, self.n_kv_head, self.head_dim)
        q = apply_rotary(rms_norm(q), cos, sin) * QK_SCALE
        k = apply_rotary(rms_norm(k), cos, sin) * QK_SCALE
        y = attention(q, k, v, window) if kv_cache is None else kv_cache.attend(q, k, v)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, has_value_embed):
        super().__init__()
        self.attn = CausalSelfAttention(config, has_value_embed)
        self.mlp = MLP(config)

    def forward(self, x, value_embed, cos, sin, window, kv_cache=None, mlp_norm_gain=None):
        x = x + self.attn(rms_norm(x), value_embed, cos, sin, window, kv_cache)
        h = rms_norm(x)
        return x + self.mlp(h if mlp_norm_gain is None else h * mlp_norm_gain)


# -----------------------------------------------------------------------------
# the loss: soft-capped cross-entropy through the lm_head without full logits

def softcapped_logits(x, weight, vocab_size, softcap):
    """fp32 logits of x (N, d) against weight (Vp, d), padded vocab cut off, soft-capped."""
    logits = F.linear(x, weight.to(x.dtype))[:, :vocab_size].float()
    return softcap * torch.tanh(logits / softcap)


def _chunk_rows(vocab_size):
    return max(128, LOSS_CHUNK_ELEMENTS // vocab_size)


def _fp16_safe_rows(rows, n_embd):
    """Rows per fused-loss chunk under fp16: the chunk's grad_w product sums, per entry, |dlogits| <= 1
    times |x| <= sqrt(n_embd) (x is RMS-normed) over its rows, and that sum must stay under fp16's max."""
    return min(rows, max(1, int(FP16_SAFE_MAX / math.sqrt(n_embd))))


def chunked_token_losses(x, weight, targets, vocab_size, softcap):
    """Per-row cross-entropy (N,), 0 where target < 0; no autograd, one chunk of logits at a time."""
    losses = []
    with torch.no_grad():
        for s in range(0, x.size(0), _chunk_rows(vocab_size)):
            z = softcapped_logits(x[s:s + _chunk_rows(vocab_size)], weight, vocab_size, softcap)
            t = targets[s:s + z.size(0)]
            z_t = z.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
            losses.append(torch.where(t >= 0, torch.logsumexp(z, -1) - z_t, 0.0))
    return torch.cat(losses)


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """scale * sum of soft-capped cross-entropy over rows, gradients computed chunk by chunk in forward.

    Only the gradients (same size as x and the weight) are kept for backward, never the logits.
    The logit gradient is formed in fp32 and cast to the activation dtype for the two matmuls,
    as autograd through `softcapped_logits` + cross_entropy does, but without `scale` (1 / token
    count for the mean): under fp16 the loss scale only arrives in backward, and (p - y) / N for
    N ~ 3e4 tokens underflows fp16 (issue 14: 99.7% of the entries were 0 at vocab 32768).
    `scale` is applied in backward, together with the incoming gradient (the loss scale), in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, scale, vocab_size, softcap):
        w = weight.to(x.dtype)
        rows = _chunk_rows(vocab_size)
        if x.dtype == torch.float16:
            rows = _fp16_safe_rows(rows, x.size(1))
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x_chunks, grad_w = [], torch.zeros_like(weight, dtype=torch.float32)
        for s in range(0, x.size(0), rows):
            xs, t = x[s:s + rows], targets[s:s + rows]
            z = softcapped_logits(xs, w, vocab_size, softcap)
            lse = torch.logsumexp(z, -1)
            valid = t >= 0
            safe_t = t.clamp(min=0)[:, None]
            total = total + torch.where(valid, lse - z.gather(1, safe_t).squeeze(1), 0.0).sum()
            dz = torch.exp(z - lse[:, None]).scatter_add(1, safe_t, -torch.ones_like(z[:, :1]))
            dlogits = (dz * valid[:, None] * (1 - (z / softcap) ** 2)).to(x.dtype)  # entries in [-1, 1]
            grad_x_chunks.append(dlogits @ w[:vocab_size])
            grad_w[:vocab_size] += (dlogits.t() @ xs).float()
        ctx.save_for_backward(torch.cat(grad_x_chunks), grad_w, scale)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, scale = ctx.saved_tensors
        grad_scale = grad_out.float() * scale  # fp32 0-D: loss scale x 1/N, never rounded to fp16 on its own
        return grad_x * grad_scale, grad_w * grad_scale, None, None, None, None


def fused_head_cross_entropy(x, weight, targets, vocab_size, softcap, reduction="mean"):
    """Cross-entropy of the soft-capped lm_head logits of x (N, d); targets < 0 are ignored.

    reduction: 'mean' over valid targets, 'sum', or 'none' (per-row, evaluation only).
    """
    if reduction == "none":
        return chunked_token_losses(x, weight, targets, vocab_size, softcap)
    if reduction == "mean":
        scale = 1.0 / (targets >= 0).sum().clamp(min=1).float()
    elif reduction == "sum":
        scale = torch.ones((), dtype=torch.float32, device=x.device)
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _FusedHeadCrossEntropy.apply(x, weight, targets, scale, vocab_size, softcap)
    return chunked_token_losses(x, weight, targets, vocab_size, softcap).sum() * scale


def plain_cross_entropy(x, weight, targets, vocab_size, softcap, reduction="mean"):
    """Reference loss through full logits (what fused_head_cross_entropy must equal)."""
    z = softcapped_logits(x, weight, vocab_size, softcap)
    return F.cross_entropy(z, targets, ignore_index=-1, reduction=reduction)


# -----------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, config, compute_dtype=None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype or COMPUTE_DTYPE
        self.window_sizes = config.window_sizes()
        V, C = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * config.head_dim
        # _weight: no default init (init_weights sets every weight); on the meta device nn.Embedding's own
        # normal_ runs as a Python decomposition that imports torch._dynamo, ~1.9 s of start-up (dev/LOG.md 2026-12-03)
        self.wte = nn.Embedding(V, C, _weight=torch.empty(V, C))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim, _weight=torch.empty(V, kv_dim))
                                           for i in range(config.n_layer) if config.has_value_embed(i)})
        if self.compute_dtype == torch.bfloat16:
            # RECIPE "Dtypes": token and value embeddings stored in bf16 (a lookup reads them in bf16
            # anyway): at d24 fp32 copies cost ~2.7 GB per GPU and twice the gradient traffic. AdamW
            # keeps fp32 state and math (optim.adamw_update); NANOCHAT_DTYPE=float32 keeps them fp32.
            self.wte.to(torch.bfloat16)
            self.value_embeds.to(torch.bfloat16)
        self.blocks = nn.ModuleList([Block(config, config.has_value_embed(i)) for i in range(config.n_layer)])
        self.lm_head = Linear(C, V)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        if config.norm_gains:
            if self.compute_dtype == torch.float16:
                # the fused loss's fp16 chunking bounds each hidden entry by sqrt(n_embd), true only when the
                # final hidden state is RMS-normed without a gain (_fp16_safe_rows)
                raise ValueError("norm_gains (--norm-gains 1) does not run in fp16: use bf16 or float32")
            self.mlp_norm_gains = nn.Parameter(torch.ones(config.n_layer, C))
            self.final_norm_gain = nn.Parameter(torch.ones(C))
        # rotary tables: shape only, init_weights computes them (on the meta device arange would import dynamo too)
        rotary_shape = (1, config.sequence_len, 1, config.head_dim // 2)
        self.register_buffer("cos", torch.empty(rotary_shape), persistent=False)
        self.register_buffer("sin", torch.empty(rotary_shape), persistent=False)

    @classmethod
    def build(cls, config, device, seed=None, compute_dtype=None, c_fc_init_scale=C_FC_INIT_SCALE):
        """Built on the meta device (no memory, no init cost), materialised on `device`, initialised
        explicitly; seed=None leaves the global RNG as it is (e.g. weights about to be loaded)."""
        with torch.device("meta"):
            model = cls(config, compute_dtype=compute_dtype)
        model.to_empty(device=device)
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights(c_fc_init_scale)
        return model

    @torch.no_grad()
    def init_weights(self, c_fc_init_scale=C_FC_INIT_SCALE):
        """Initialises every parameter and buffer in place (run after to_empty() from the meta device).
        c_fc_init_scale is an init, not an architecture: it is not in GPTConfig (a checkpoint loads over it)."""
        # values from RECIPE.md "Initialization" (the reference's R1/R2 record recipe)
        L = self.config.n_layer
        bound = (3 / self.config.n_embd) ** 0.5  # uniform with std 1/sqrt(fan_in)
        nn.init.normal_(self.wte.weight, std=0.8)  # R1: 0.8 (was 1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            # C_FC_INIT_SCALE (R2: 0.4x, R1 0.5x). Kept: the plain bound was 0.02 bpb better in narrow 120-step
            # CPU runs, where Muon's steps on c_fc sum to 0.2, below the init's spectral norm (1.2), so the init
            # never fades; at the default width and LRs it is -0.004 +- 0.009 (d4) and -0.021 +- 0.011 (d6), not
            # beyond noise. The d24 record's steps sum to ~220 (dev/LOG.md 2026-11-30 and 2026-12-06)
            nn.init.uniform_(block.mlp.c_fc.weight, -c_fc_init_scale * bound, c_fc_init_scale * bound)
            # zero output projections: every block starts as the identity on the residual stream
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                # small positive weights (R1; was 0): the gate starts input-dependent, not flat
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        # per-layer schedules (R2; were 1.0 and 0.1): early layers keep more of their residual and
        # of x0, deep layers start closer to a plain residual stream
        depth_frac = torch.arange(L, dtype=torch.float32, device=self.resid_lambdas.device) / max(1, L - 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        # RECIPE "Smear and backout at HEAD": smear off at start (lambda 0) with a small positive
        # gate, backout at 0.2. The reference's record commit never set them (uninitialised memory
        # after to_empty); here every parameter is written (test_init_weights_writes_everything)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        for gain in self.norm_gain_params():
            gain.fill_(1.0)  # unit gains: the model starts exactly as it would without them
        self.cos, self.sin = rotary_tables(self.config.sequence_len, self.config.head_dim, self.wte.weight.device)

    def hidden_states(self, idx, cache=None):
        """Final normalised hidden states (B, T, C) in the compute dtype.

        cache: an engine.KVCache (cached decoding): idx are the next T tokens of every row, at the
        positions and with the keys and last embedding the cache holds; it moves past them.
        None: idx is a whole sequence from position 0 (training, evaluation).
        """
        T = idx.size(1)
        if cache is None:
            if T > self.config.sequence_len:
                raise ValueError(f"sequence of {T} tokens exceeds the model's sequence_len {self.config.sequence_len}")
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:
            positions = cache.positions(T)  # (B, T): each row's own positions (rows are left-padded)
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
        dtype = self.compute_dtype
        e = rms_norm(self.wte(idx).to(dtype))
        x = self.smear(e) if cache is None else self.smear(e, cache.prev_embed, positions > 0)
        x0 = x  # taken after smearing: every layer's x0 mix carries the bigram signal too
        backout_layer, mid = self.config.n_layer // 2, None
        mlp_gains = self.mlp_norm_gains.to(dtype) if self.config.norm_gains else [None] * self.config.n_layer
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if str(i) in self.value_embeds else None
            layer_cache = None if cache is None else cache.layers[i]
            x = block(x, ve, cos, sin, self.window_sizes[i], layer_cache, mlp_gains[i])
            if i == backout_layer:
                mid = x
        if cache is not None:
            cache.advance(T, e[:, -1:])
        # backout (RECIPE R2): subtract a learned share of the residual after block L//2, so the
        # head reads less of the mid-depth features the later blocks have already used
        x = rms_norm(x - self.backout_lambda.to(dtype) * mid)
        return x * self.final_norm_gain.to(dtype) if self.config.norm_gains else x

    def norm_gain_params(self):
        """Selective RMSNorm scales (PR #830, config.norm_gains): a learnable per-channel gain, init 1, on the
        pre-MLP norm of every block and on the final norm; the pre-attention, embedding and QK norms stay
        parameter-free. The gains train with the resid lambdas (small AdamW steps). [] when off."""
        return [self.mlp_norm_gains, self.final_norm_gain] if self.config.norm_gains else []

    def smear(self, e, prev=None, has_prev=None):
        """Smear (RECIPE R2): e_t += lambda_s * sigmoid(w . e_t[:24]) * e_{t-1} for t >= 1.

        A cheap bigram path: each position gets a gated share of the previous token's (un-smeared)
        embedding before the first block. No masking at document boundaries, as in the reference.
        Cached decoding passes prev (B, 1, C), the embedding before e[:, 0], and has_prev (B, T),
        False where a token has no predecessor (a row's first token, left padding).
        """
        if prev is None:
            gate = self._smear_gate(e[:, 1:, :SMEAR_CHANNELS])
            return torch.cat([e[:, :1], e[:, 1:] + gate * e[:, :-1]], dim=1)
        e_prev = torch.cat([prev, e[:, :-1]], dim=1)
        return torch.where(has_prev.unsqueeze(-1), e + self._smear_gate(e[..., :SMEAR_CHANNELS]) * e_prev, e)

    def freeze_smear(self):
        """Leave-one-out of smear (base_train --smear 0): its lambda stays at its init 0 and neither it nor the
        gate gets a gradient, so the model computes exactly what it would without smear, and still saves,
        exports and caches as the model it is."""
        for p in (self.smear_lambda, self.smear_gate.weight):
            p.requires_grad_(False)

    def _smear_gate(self, channels):
        """lambda_s * sigmoid(w . channels): the share of e_{t-1} each token gets, from its first 24 channels."""
        return self.smear_lambda.to(channels.dtype) * torch.sigmoid(self.smear_gate(channels))

    def forward(self, idx, targets=None, loss_reduction="mean"):
        """Logits (B, T, vocab) in fp32 without targets; with targets (-1 = ignore) the loss.

        loss_reduction 'none' returns per-token losses (B, T) for evaluation.
        """
        x = self.hidden_states(idx)
        cfg = self.config
        if targets is None:
            B, T, C = x.shape
            return softcapped_logits(x.view(B * T, C), self.lm_head.weight, cfg.vocab_size, cfg.softcap).view(B, T, -1)
        loss = fused_head_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                        cfg.vocab_size, cfg.softcap, loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

    # -- accounting ---------------------------------------------------------------

    def num_params_by_kind(self):
        """Parameter counts: wte, value_embeds, matrices (inside blocks), lm_head, scalars (incl. the smear gate)."""
        return {
            "wte": self.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "matrices": sum(p.numel() for p in self.blocks.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "scalars": sum(p.numel() for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                                self.smear_lambda, self.backout_lambda, *self.norm_gain_params())),
        }

    def num_scaling_params(self):
        """Kaplan-style count (block matrices + lm_head, no embeddings) used for the tokens:params ratio."""
        counts = self.num_params_by_kind()
        return counts["matrices"] + counts["lm_head"]

    def estimate_flops(self):
        """Training FLOPs per token: 6 * matmul weights + attention's 12 * heads * head_dim * window per layer."""
        cfg = self.config
        attn_flops = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in self.window_sizes)
        return 6 * self.num_scaling_params() + attn_flops

    # -- sampling -----------------------------------------------------------------

    def generate(self, tokens, max_new_tokens, temperature=0.0, top_k=None, seed=42, top_p=None, stop_token=None):
        """Yields new token ids after the prompt `tokens` (a list). temperature 0 is greedy.

        One row of nanochat.engine.stream (KV cache): stops after max_new_tokens or at stop_token
        (e.g. the tokenizer's BOS), refuses prompt + max_new_tokens - 1 > sequence_len.
        """
        from nanochat.engine import stream  # the engine imports this module
        for (token,) in stream(self, [tokens], max_new_tokens, temperature, top_k, top_p, seed, stop_token):
            yield token

    # -- optimizer ----------------------------------------------------------------

    def setup_optimizer(self, matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, gate_lr=0.2,
                        weight_decay=0.0, muon_eq=True, muon_plus=True, compiled=True):
        """A MuonAdamW over every parameter: Muon for the block matrices, AdamW for everything else.

        Groups, betas, eps and weight decays are the reference's record recipe (RECIPE.md,
        "Optimizer"); LRs are the values at batch 2^19, the caller scales them with the batch:
        - Muon, one group per matrix shape (they are stacked; the ve_gates are block matrices too):
          matrix_lr (x max(1, rows/cols)^0.5 inside the step), NorMuon beta2 0.9, momentum set by the
          loop's schedule, weight_decay (the loop passes the T_epoch-rule value and fades it), and
          the MuonEq / Muon+ refinements (switchable to measure them);
        - AdamW, eps 1e-10, plain decoupled weight decay that stays constant. Embedding and head
          LRs are times (n_embd / 768)^-0.5 so wider models take smaller steps:
            lm_head       unembedding_lr        betas (0.8, 0.96)   wd 0.01
            wte           embedding_lr          betas (0.8, 0.995)  wd 0.001
            value embeds  embedding_lr * 0.5    betas (0.8, 0.995)  wd 0.01
            resid_lambdas scalar_lr * 0.01      betas (0.8, 0.95)   wd 0.05  (they scale the whole
            (+ norm gains)                                                   residual: small steps)
            x0_lambdas    scalar_lr             betas (0.96, 0.95)  wd 0
            smear gate, smear and backout lambdas: gate_lr (RECIPE's 0.2, scaled neither with the width nor with
                          the batch), (0.8, 0.95), wd 0
        compiled: torch.compile the update functions (one cold compile per parameter shape).
        """
        from nanochat.optim import MuonAdamW, default_orth_dtype  # imported on use: the model itself never needs the optimizer

        width_lr_scale = (self.config.n_embd / 768) ** -0.5
        matrices = list(self.blocks.parameters())
        shapes = sorted({tuple(p.shape) for p in matrices})
        groups = [dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                       weight_decay=weight_decay, beta2=0.9, muon_eq=muon_eq, muon_plus=muon_plus) for shape in shapes]

        def adamw(params, lr, betas, wd):
            return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=wd, cautious=False)
        groups += [
            adamw([self.lm_head.weight], unembedding_lr * width_lr_scale, (0.8, 0.96), 0.01),
            adamw([self.wte.weight], embedding_lr * width_lr_scale, (0.8, 0.995), 0.001),
            adamw(list(self.value_embeds.parameters()), 0.5 * embedding_lr * width_lr_scale, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas, *self.norm_gain_params()], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], gate_lr, (0.8, 0.95), 0.0),
        ]
        groups = [g for g in groups if g["params"]]  # a 1-layer model without value embeddings has no VE group
        grouped = [p for group in groups for p in group["params"]]
        if len(grouped) != len(list(self.parameters())) or set(grouped) != set(self.parameters()):
            raise RuntimeError("setup_optimizer: a parameter of GPT is missing from the optimizer groups "
                               "(or in two): give any new parameter a group here")
        return MuonAdamW(groups, compiled=compiled, orth_dtype=default_orth_dtype(self.compute_dtype))
