"""Generation with a KV cache: prefill the prompts, then one token per step, exactly the model's function.

The model's own modules do all the math: `GPT.hidden_states(idx, cache)` runs the same embedding,
smear, blocks, backout and norm as training, and each `CausalSelfAttention` hands its q, k, v to
its `LayerCache` instead of `attention()`. This file only keeps state and picks tokens.

- Batching: prompts of different lengths are LEFT-padded to the longest. Every row then writes
  the same cache slot at every step (one write index, one slot -> index map for the batch) and
  every row's last prompt token sits in the last column, so the first sampled tokens come from
  one column. Row b's token at slot s has position s - pad_b: rotary angles come from that,
  padding keys are masked out of every query, and smear is off at a row's first token, so each
  row computes what a forward over its own unpadded tokens computes.
- Windows: a layer with window w keeps min(w, slots) keys in a ring: slot s lives at index
  s % capacity. A query at slot p needs keys p - w < s <= p, so when a new key overwrites
  slot p - w that key is no longer needed. The long layers (w = sequence_len) have capacity =
  every slot of this batch, so they never wrap. A one-token step writes its key, then attends
  over the ring; a multi-token chunk (prefill) attends over ring + its own keys first (its later
  keys would overwrite keys its earlier queries still need), then writes its last keys.
- Smear needs e_{t-1}, the previous token's normalised un-smeared embedding: the cache keeps
  the last one of every row.
- Past sequence_len: refused (ValueError) before any work. A row reads at most sequence_len
  tokens (prompt + max_new_tokens - 1, the last sampled token is never read): the rotary tables
  and the trained context end there, and a full forward refuses longer inputs too, so there is
  no reference a longer cached run could be exact against.
"""

import torch
import torch.nn.functional as F

from nanochat.gpt import softcapped_logits


class KVCache:
    """Decoding state of one batch: every layer's keys and values, each row's left padding, the last embeddings."""

    def __init__(self, model, pads, max_slots):
        cfg, device = model.config, model.wte.weight.device
        self.pads = torch.tensor(pads, dtype=torch.long, device=device)  # (B,) padding slots before each row
        self.max_slots = max_slots
        self.slot = 0  # the next slot to write: the same for every row
        self.prev_embed = torch.zeros(len(pads), 1, cfg.n_embd, dtype=model.compute_dtype, device=device)
        shape = (len(pads), cfg.n_kv_head, cfg.head_dim)
        self.layers = [LayerCache(self, window, min(window, max_slots), shape, model.compute_dtype, device)
                       for window in model.window_sizes]

    def positions(self, n):
        """(B, n) positions of the next n slots in each row; left padding reads as position 0."""
        if self.slot + n > self.max_slots:
            raise RuntimeError(f"KV cache full: {self.slot} + {n} slots > the {self.max_slots} it was made for")
        slots = torch.arange(self.slot, self.slot + n, device=self.pads.device)
        return (slots[None, :] - self.pads[:, None]).clamp(min=0)

    def advance(self, n, last_embed):
        """After a forward over n new slots: its last normalised embedding (B, 1, C) is the next smear's e_{t-1}."""
        self.slot += n
        self.prev_embed = last_embed

    def mask(self, q_slots, k_slots, window):
        """(B, 1, n, K) True where a query may read a key: causal, inside the window, not padding.

        A query also reads itself, so a padding query's softmax is never empty (an all-masked row
        would give NaN, and 0 * NaN through its value would reach the real queries)."""
        distance = q_slots[:, None] - k_slots[None, :]
        band = (distance >= 0) & (distance < window)
        real = k_slots[None, :] >= self.pads[:, None]  # (B, K)
        return (band & (real[:, None, :] | (distance == 0))).unsqueeze(1)


class LayerCache:
    """One layer's keys and values, (B, Hkv, capacity, D): a ring where slot s is at index s % capacity."""

    def __init__(self, cache, window, capacity, shape, dtype, device):
        B, Hkv, D = shape
        self.cache, self.window, self.capacity = cache, window, capacity
        self.k = torch.zeros(B, Hkv, capacity, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slots = torch.zeros(capacity, dtype=torch.long, device=device)  # the slot each index holds

    def attend(self, q, k, v):
        """Attention of q (B, n, H, D) at the next n slots over the cached keys and k, v (B, n, Hkv, D); stores k, v."""
        start, n = self.cache.slot, q.size(1)
        new_slots = torch.arange(start, start + n, device=q.device)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if n == 1:  # the key it overwrites (slot start - window) is outside this query's window
            self._write(new_slots, k, v)
            filled = min(start + 1, self.capacity)  # slots fill indices in order: the first `filled` are written
            keys, values, key_slots = self.k[:, :, :filled], self.v[:, :, :filled], self.slots[:filled]
        else:
            filled = min(start, self.capacity)
            keys = torch.cat([self.k[:, :, :filled], k], dim=2)
            values = torch.cat([self.v[:, :, :filled], v], dim=2)
            key_slots = torch.cat([self.slots[:filled], new_slots])
            self._write(new_slots, k, v)
        mask = self.cache.mask(new_slots, key_slots, self.window)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                           enable_gqa=keys.size(1) != q.size(2))
        return y.transpose(1, 2)

    def _write(self, new_slots, k, v):
        keep = min(new_slots.numel(), self.capacity)  # of a chunk longer than the ring only the last keys stay
        index = new_slots[-keep:] % self.capacity
        self.k.index_copy_(2, index, k[:, :, -keep:])
        self.v.index_copy_(2, index, v[:, :, -keep:])
        self.slots[index] = new_slots[-keep:]


def start(model, prompts, max_new_tokens):
    """A KVCache for `prompts` (lists of ids) and the left-padded (B, P) prompt tensor to feed it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with BOS)")
    longest, limit = max(len(p) for p in prompts), model.config.sequence_len
    if longest + max_new_tokens - 1 > limit:
        raise ValueError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens reads {longest + max_new_tokens - 1} "
                         f"positions, more than the model's sequence_len {limit}: shorten the prompt or the max new tokens")
    pads = [longest - len(p) for p in prompts]
    idx = torch.tensor([[0] * pad + list(p) for pad, p in zip(pads, prompts)], dtype=torch.long,
                       device=model.wte.weight.device)
    return KVCache(model, pads, longest + max_new_tokens - 1), idx


def step(model, cache, idx):
    """fp32 logits (B, vocab) after the last of idx (B, n), the next n tokens of every row; the cache moves past them."""
    x = model.hidden_states(idx, cache)[:, -1]
    return softcapped_logits(x, model.lm_head.weight, model.config.vocab_size, model.config.softcap)


# -----------------------------------------------------------------------------
# picking the next token

def top_k_filter(logits, k):
    """Logits with all but the k largest of each row set to -inf (ties with the k-th are kept)."""
    kth = torch.topk(logits, min(k, logits.size(-1))).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Logits outside each row's nucleus set to -inf: the fewest most likely tokens whose probability reaches p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above: the top token always stays (0 < p)
    sorted_logits = sorted_logits.masked_fill(before >= p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def check_sampling(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for all), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for all), got {top_p}")


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """(B,) next ids from fp32 logits (B, V): argmax at temperature 0, else a draw after temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng).squeeze(1)


@torch.no_grad()
def stream(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, stop_token=None):
    """Yields, per step, a list with every row's new token, None for a row that has stopped.

    A row stops when it samples `stop_token` (e.g. the tokenizer's BOS: a new document), which is
    not yielded; the stream ends when every row has stopped or after max_new_tokens steps.
    seed: a torch.Generator for the draws (None: the global RNG); greedy draws nothing.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens <= 0:
        return
    cache, idx = start(model, prompts, max_new_tokens)
    rng = None if seed is None else torch.Generator(device=idx.device).manual_seed(seed)
    logits = step(model, cache, idx)
    stopped = [False] * len(prompts)
    for i in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_k, top_p, rng)
        tokens = next_ids.tolist()
        stopped = [s or t == stop_token for s, t in zip(stopped, tokens)]
        if all(stopped):
            return
        yield [None if s else t for s, t in zip(stopped, tokens)]
        if i + 1 < max_new_tokens:  # the last token is never read: no forward for it
            logits = step(model, cache, next_ids[:, None])


def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, stop_token=None):
    """Every row's new tokens (a list of lists of ids), through `stream`."""
    rows = [[] for _ in prompts]
    for tokens in stream(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token):
        for row, token in zip(rows, tokens):
            if token is not None:
                row.append(token)
    return rows


def complete(model, tokenizer, texts, max_new_tokens, **sampling):
    """Each text's continuation as a string, for display: BOS + text is the prompt, a row stops at BOS (a new
    document) or after max_new_tokens, cut to what the context holds after the longest prompt (no refusal).
    sampling: temperature, top_k, top_p, seed as in `stream` (default greedy)."""
    prompts = tokenizer.encode(list(texts), prepend_bos=True)
    room = model.config.sequence_len + 1 - max(len(p) for p in prompts)
    rows = generate(model, prompts, min(max_new_tokens, room), stop_token=tokenizer.bos_token_id, **sampling)
    return [tokenizer.decode(row) for row in rows]
