"""nanochat's GPT as a 🤗 transformers model (trust_remote_code): its configuration and forward pass.

scripts/export_hf.py copies this file into an export folder, whose config.json names it in `auto_map`,
so it must stand alone: it imports torch and transformers, never nanochat. Its forward is
nanochat/gpt.py's, step for step (smear, per-layer resid/x0 lambdas, value embeddings through a
3 * sigmoid gate, parameter-free QK-norm then rotary then x1.2, sliding windows, ReLU^2, backout,
the optional pre-MLP and final norm gains (--norm-gains), soft-capped logits with the padded vocab
cut off), and the weights keep gpt.py's names, so a checkpoint's model.safetensors loads as it is. transformers' built-in `nanochat` architecture is not
this model: it has no smear, backout, value embeddings, lambdas or sliding windows, applies QK-norm
after rotary (rotating the other way) without the 1.2 scale, and normalises the embedding twice.

Generation goes through transformers' cache (a DynamicCache; every layer keeps all its keys and a
short-window layer masks the old ones). What the cache cannot hold is smear's input, the previous
token: `prev_input_ids` carries it into each cached step (prepare_inputs_for_generation supplies it).
Left-padded batches work: positions count from each row's first real token, as in an unpadded run.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class NanoChatGPTConfig(PreTrainedConfig):
    """Everything the forward pass needs, spelled out (window sizes and value-embedding layers as lists),
    so this file never repeats gpt.GPTConfig's rules."""

    model_type = "nanochat_gpt"  # not transformers' own "nanochat", which is a different network
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    vocab_size: int = 32768  # the tokenizer's; logits have this many columns
    padded_vocab_size: int = 32768  # rows of wte, value embeddings and lm_head
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    sequence_len: int = 2048
    window_sizes: list | None = None  # keys visible per query, per layer (gpt.GPTConfig.window_sizes())
    value_embed_layers: list | None = None  # layers with a value embedding
    softcap: float = 15.0
    norm_gains: bool = False  # learnable gains on the pre-MLP and final norms (gpt.GPT.norm_gain_params)
    rotary_base: float = 100_000
    qk_scale: float = 1.2
    smear_channels: int = 24
    ve_gate_channels: int = 12
    tie_word_embeddings: bool = False
    use_cache: bool = True

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary(positions, head_dim, base):
    """cos, sin (B, T, 1, D/2) for integer positions (B, T), computed as gpt.rotary_tables does."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x, cos, sin):
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Linear(nn.Linear):
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.config = layer_idx, config
        H, Hkv, D, C = config.n_head, config.n_kv_head, config.head_dim, config.n_embd
        self.c_q, self.c_k, self.c_v, self.c_proj = Linear(C, H * D), Linear(C, Hkv * D), Linear(C, Hkv * D), Linear(H * D, C)
        self.ve_gate = Linear(config.ve_gate_channels, Hkv) if layer_idx in config.value_embed_layers else None

    def forward(self, x, value_embed, cos, sin, mask, cache):
        cfg, (B, T, _) = self.config, x.shape
        q = self.c_q(x).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.c_k(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        v = self.c_v(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        if value_embed is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :cfg.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, cfg.n_kv_head, cfg.head_dim)
        q = apply_rotary(rms_norm(q), cos, sin) * cfg.qk_scale
        k = apply_rotary(rms_norm(k), cos, sin) * cfg.qk_scale
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        gqa = cfg.n_kv_head != cfg.n_head
        if mask is None:  # a fresh unpadded sequence within the window: the call gpt.py makes
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc, self.c_proj = Linear(config.n_embd, 4 * config.n_embd), Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn, self.mlp = Attention(config, layer_idx), MLP(config)

    def forward(self, x, value_embed, cos, sin, mask, cache, mlp_norm_gain=None):
        x = x + self.attn(rms_norm(x), value_embed, cos, sin, mask, cache)
        h = rms_norm(x)
        return x + self.mlp(h if mlp_norm_gain is None else h * mlp_norm_gain)


def attention_mask_for(window, query_index, key_valid):
    """Boolean (B, 1, Tq, Tk): query at cache index i sees key j when i - window < j <= i and j is a real
    token. A padding query also sees itself, so its softmax row is never empty (an all-masked row would
    give NaN values that leak into real rows through 0 * NaN)."""
    key_index = torch.arange(key_valid.size(1), device=key_valid.device)
    distance = query_index[:, None] - key_index[None, :]
    allowed = (distance >= 0) & (distance < window)
    return (allowed[None] & (key_valid[:, None, :] | (distance == 0)[None]))[:, None]


class NanoChatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatGPTConfig
    base_model_prefix = "nanochat"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        V, C = config.padded_vocab_size, config.n_embd
        self.wte = nn.Embedding(V, C)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, config.n_kv_head * config.head_dim)
                                           for i in config.value_embed_layers})
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = Linear(C, V)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(config.smear_channels, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        if config.norm_gains:
            self.mlp_norm_gains = nn.Parameter(torch.ones(config.n_layer, C))
            self.final_norm_gain = nn.Parameter(torch.ones(C))
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """transformers' inputs for one step, plus the token before them for smear once the cache holds some."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs["input_ids"].size(1)
        if input_ids.size(1) > new:
            inputs["prev_input_ids"] = input_ids[:, -new - 1:-new]
        return inputs

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, prev_input_ids=None,
                logits_to_keep=0, **kwargs):
        """logits (B, T, vocab_size) in fp32. attention_mask (B, past + T), 1 = real token, for padded batches.
        With a cache that already holds tokens, prev_input_ids (B, 1) is the token before input_ids[:, 0]."""
        cfg = self.config
        cache = kwargs.pop("past_key_values", cache)
        if cache is None and use_cache:  # a plain call (scoring) keeps no cache; generate passes use_cache=True
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if past and prev_input_ids is None:
            raise ValueError("the cache holds earlier tokens: pass prev_input_ids, the token before input_ids "
                             "(smear mixes in the previous token's embedding)")
        key_valid = (attention_mask.bool() if attention_mask is not None
                     else torch.ones(B, past + T, dtype=torch.bool, device=input_ids.device))
        positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # each row counts from its first real token
        if int(positions.max()) >= cfg.sequence_len:
            raise ValueError(f"position {int(positions.max())} is past the model's sequence_len {cfg.sequence_len}")
        cos, sin = rotary(positions, cfg.head_dim, cfg.rotary_base)
        query_index = torch.arange(past, past + T, device=input_ids.device)
        unmasked = attention_mask is None or bool(key_valid.all())
        masks = {w: None if unmasked and past == 0 and w >= T else attention_mask_for(w, query_index, key_valid)
                 for w in set(cfg.window_sizes)}

        x = self.smear(rms_norm(self.wte(input_ids)), prev_input_ids, positions)
        x0, mid = x, None
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            mlp_norm_gain = self.mlp_norm_gains[i] if cfg.norm_gains else None
            x = block(x, ve, cos, sin, masks[cfg.window_sizes[i]], cache, mlp_norm_gain)
            if i == cfg.n_layer // 2:
                mid = x
        x = rms_norm(x - self.backout_lambda * mid)
        if cfg.norm_gains:
            x = x * self.final_norm_gain
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(x, self.lm_head.weight)[..., :cfg.vocab_size].float()
        logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def smear(self, e, prev_input_ids, positions):
        """e_t += smear_lambda * sigmoid(w . e_t[:24]) * e_{t-1} at every position but a row's first."""
        prev = e[:, :-1]
        if prev_input_ids is not None:
            prev = torch.cat([rms_norm(self.wte(prev_input_ids)), prev], dim=1)
        else:
            prev = torch.cat([torch.zeros_like(e[:, :1]), prev], dim=1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(e[..., :self.config.smear_channels]))
        return e + (positions > 0)[..., None] * gate * prev
