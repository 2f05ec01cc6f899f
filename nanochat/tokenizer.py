"""The BPE tokenizer: training (rustbpe), fast encoding (tiktoken), byte lengths, save/load.

Byte-level BPE with a GPT-4-style split regex whose only change is that digits are grouped
1-2 at a time instead of 1-3 (shared NOTES.md, "Data"). `rustbpe` learns the merges;
encoding goes through a `tiktoken.Encoding` built from the same ranks and pattern, which
gives identical ids and batch-encodes on threads. Special tokens are appended after the
learned ranks, `<|bos|>` first, so vocab_size = learned ranks + special tokens.

The on-disk format is one JSON file (pattern, base64 token bytes in rank order, special
tokens): loading it parses data and executes nothing, unlike a pickle.
"""

import base64
import hashlib
import json
import os

import tiktoken
import torch

from nanochat.common import get_base_dir

# GPT-4's split pattern with \p{N}{1,3} -> \p{N}{1,2}: shorter digit groups spend fewer
# ranks on numbers, which pays off at vocab 2^15 (shared NOTES.md).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ["<|bos|>"]  # appended after the learned ranks in this order; BOS must stay first
TOKENIZER_FILENAME = "tokenizer.json"
FORMAT_VERSION = "nanochat-bpe-1"
RETRAIN = "rerun `python -m scripts.tok_train`"


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded as asked; the message says what to do."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """No tokenizer.json where one was expected."""


class Tokenizer:
    """Learned ranks + special tokens, encoded and decoded through tiktoken."""

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        """mergeable_ranks: dict token bytes -> rank, ranks exactly 0..n-1."""
        n_ranks = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n_ranks)):
            raise ValueError("mergeable ranks must be exactly 0..n-1, each once")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = {name: n_ranks + i for i, name in enumerate(special_tokens)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=self.mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.bos_token_id = self.special_tokens["<|bos|>"]
        self.vocab_size = n_ranks + len(self.special_tokens)
        self._token_bytes = None

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learns vocab_size - len(SPECIAL_TOKENS) ranks with rustbpe from an iterator of strings."""
        import rustbpe  # training-only dependency: loading and encoding never need it
        n_learned = vocab_size - len(SPECIAL_TOKENS)
        if n_learned < 256:
            raise TokenizerError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                             f"plus {len(SPECIAL_TOKENS)} special token(s), so at least {256 + len(SPECIAL_TOKENS)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(text_iterator, n_learned, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != n_learned:
            # rustbpe stops early when no pair occurs twice; a smaller vocab would break callers' shapes
            raise TokenizerError(f"the training text allowed only {len(ranks)} ranks, {n_learned} were asked for: "
                             "train on more text (raise --max-chars) or lower --vocab-size")
        return cls(ranks, SPLIT_PATTERN, SPECIAL_TOKENS)

    # -------------------------------------------------------------------------
    # encode / decode

    def encode(self, text, prepend_bos=False, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]] (batch-encoded on num_threads threads).

        Special-token strings inside the text are encoded as ordinary text, never as specials.
        """
        prefix = [self.bos_token_id] if prepend_bos else []
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text)
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        ids = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        return [prefix + row for row in ids] if prepend_bos else ids

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def id_to_token_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self):
        """int32 (vocab_size,): UTF-8 bytes each id stands for, 0 for special tokens (bits per byte)."""
        if self._token_bytes is None:
            lengths = [0] * self.vocab_size
            for token, rank in self.mergeable_ranks.items():
                lengths[rank] = len(token)
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32)
        return self._token_bytes

    # -------------------------------------------------------------------------
    # persistence

    def to_json_dict(self):
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        return {
            "format": FORMAT_VERSION,
            "pattern": self.pattern,
            "ranks": [base64.b64encode(token).decode("ascii") for token, _ in by_rank],
            "special_tokens": list(self.special_tokens),
        }

    def save(self, directory):
        """Writes directory/tokenizer.json atomically: a half-written file never replaces a good one."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILENAME)
        tmp_path = f"{path}.tmp.{os.getpid()}"
        with open(tmp_path, "w") as f:
            json.dump(self.to_json_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        return path

    @classmethod
    def load(cls, directory):
        """The tokenizer saved in directory; TokenizerError (one line, names the file) for anything unusable."""
        path = os.path.join(directory, TOKENIZER_FILENAME)
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            raise TokenizerNotFound(f"no tokenizer at {path}: train one with `python -m scripts.tok_train`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path} is not a valid tokenizer file ({e}): delete it and {RETRAIN}") from None
        except OSError as e:  # permissions, a directory named like the file, I/O errors
            raise TokenizerError(f"cannot read {path} ({e}): fix its permissions or pass another --tokenizer-dir") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            raise TokenizerError(f"{path} is not a {FORMAT_VERSION} tokenizer file: {RETRAIN}")
        try:
            tokens = state["ranks"]
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise TypeError("'ranks' must be a list of base64 strings")
            ranks = {base64.b64decode(token, validate=True): rank for rank, token in enumerate(tokens)}
            if len(ranks) != len(tokens):
                raise ValueError("it lists the same token twice")
            return cls(ranks, state["pattern"], state["special_tokens"])
        except (KeyError, TypeError, ValueError) as e:  # binascii.Error and a bad regex are ValueErrors too
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise TokenizerError(f"{path} is damaged ({detail}): {RETRAIN}") from None


def get_tokenizer(directory=None):
    """The trained tokenizer from directory (default: <base dir>/tokenizer)."""
    return Tokenizer.load(directory or os.path.join(get_base_dir(), "tokenizer"))


def tokenizer_signature(tokenizer):
    """16 hex chars of sha256 over pattern, ranks and specials: equal iff the tokenizers encode alike."""
    canonical = json.dumps(tokenizer.to_json_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
