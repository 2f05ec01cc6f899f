"""Export a checkpoint to a folder that 🤗 transformers loads offline, and optionally push it to the Hub.

python -m scripts.export_hf --run my-run --out hf/my-run          # latest step (--run-dir PATH works too)
python -m scripts.export_hf --run my-run --step 5000 --out hf/my-run --push-to-hub user/nanochat-d24

The folder holds model.safetensors (fp32, gpt.py's parameter names), config.json (with auto_map to
hf_model.py, a copy of nanochat/hf_model.py: transformers' own `nanochat` architecture is another
network, see that file), generation_config.json, and the tokenizer as a byte-level BPE tokenizer.json
that encodes as nanochat's tiktoken does and prepends BOS (`<|bos|>`, also EOS and pad) like
`encode(prepend_bos=True)`. Load it with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); AutoTokenizer.from_pretrained(DIR)
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from nanochat.checkpoint import CheckpointError, load_meta, resolve_step, step_dir
from nanochat.cli import ArgumentParser, run_main
from nanochat.runs import RunDirError
from nanochat.tokenizer import TokenizerError, get_tokenizer
from scripts import base_eval
from scripts.base_eval import load_model

HF_MODULE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "hf_model.py")
AUTO_MAP = {"AutoConfig": "hf_model.NanoChatGPTConfig", "AutoModelForCausalLM": "hf_model.NanoChatGPTForCausalLM"}


class ExportError(RuntimeError):
    """The export cannot be made as asked; the message says what to do."""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base_eval.add_checkpoint_flags(p)
    p.add_argument("--out", required=True, help="folder to write (created; files in it are overwritten)")
    p.add_argument("--push-to-hub", default="", metavar="REPO", help="also upload the folder to this Hub model repo, needs a token (default: none, no upload)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    args = p.parse_args(argv)
    base_eval.check_checkpoint_flags(p, args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a directory")
    return args


# -----------------------------------------------------------------------------
# tokenizer: tiktoken ranks -> a tokenizers byte-level BPE


def byte_to_unicode():
    """The byte-level alphabet of `tokenizers`' ByteLevel: printable bytes stand for themselves, the
    other 68 are shifted to code points from 256 on, so every byte is one visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab_and_merges(mergeable_ranks):
    """tiktoken's ranks as a BPE vocab and merge list. tiktoken merges, at each step, the adjacent pair
    whose concatenation has the lowest rank; `tokenizers` merges the pair listed first. So every split
    of a token into two lower-ranked tokens is listed, ordered by the rank of the token they make."""
    alphabet = byte_to_unicode()
    text = lambda token: "".join(alphabet[b] for b in token)
    vocab = {text(token): rank for token, rank in mergeable_ranks.items()}
    merges = []
    for token, rank in mergeable_ranks.items():
        for cut in range(1, len(token)):
            left, right = mergeable_ranks.get(token[:cut]), mergeable_ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, text(token[:cut]), text(token[cut:])))
    merges.sort()
    return vocab, [(a, b) for *_, a, b in merges]


def hf_tokenizer(tokenizer, max_length=None):
    """A PreTrainedTokenizerFast that encodes as `tokenizer` does and prepends BOS (add_special_tokens=True);
    max_length: the model's sequence_len (what lm-eval and pipelines truncate to)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    vocab, merges = bpe_vocab_and_merges(tokenizer.mergeable_ranks)
    # ignore_merges: a pre-token that is itself a token is emitted whole, as tiktoken does
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, token_id in specials:
        if tok.token_to_id(name) != token_id:
            raise ExportError(f"special token {name} got id {tok.token_to_id(name)}, nanochat uses {token_id}")
    bos = "<|bos|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tokenizer.bos_token_id)])
    # split_special_tokens: "<|bos|>" written in a text is ordinary text, as in nanochat's encode
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos, pad_token=bos,
                                   split_special_tokens=True, model_max_length=max_length)


# -----------------------------------------------------------------------------
# model


def hf_config(model, bos):
    """config.json's content: gpt.GPTConfig with its derived rules (windows, value-embedding layers) resolved."""
    from nanochat.hf_model import NanoChatGPTConfig
    cfg = model.config
    return NanoChatGPTConfig(
        vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, sequence_len=cfg.sequence_len, window_sizes=list(model.window_sizes),
        value_embed_layers=[i for i in range(cfg.n_layer) if cfg.has_value_embed(i)], softcap=cfg.softcap,
        norm_gains=cfg.norm_gains,
        bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, auto_map=AUTO_MAP, architectures=["NanoChatGPTForCausalLM"], dtype="float32")


def export(checkpoint_dir, tokenizer, out_dir):
    """Writes the export folder; returns its path."""
    from transformers import GenerationConfig
    from nanochat import gpt, hf_model
    model, _ = load_model(checkpoint_dir, torch.device("cpu"))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} tokens, the checkpoint's model {model.config.vocab_size}: "
                          "pass the --tokenizer-dir the run was trained with")
    # the remote module repeats gpt.py's constants: a change there must reach it
    for name, ours, theirs in [("QK_SCALE", gpt.QK_SCALE, hf_model.NanoChatGPTConfig.qk_scale),
                               ("ROTARY_BASE", gpt.ROTARY_BASE, hf_model.NanoChatGPTConfig.rotary_base),
                               ("SMEAR_CHANNELS", gpt.SMEAR_CHANNELS, hf_model.NanoChatGPTConfig.smear_channels),
                               ("VE_GATE_CHANNELS", gpt.VE_GATE_CHANNELS, hf_model.NanoChatGPTConfig.ve_gate_channels)]:
        if ours != theirs:
            raise ExportError(f"gpt.{name} is {ours} but nanochat/hf_model.py assumes {theirs}: update hf_model.py")
    os.makedirs(out_dir, exist_ok=True)
    weights = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}  # bf16 embeddings -> fp32 exactly
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    bos = tokenizer.bos_token_id
    hf_config(model, bos).save_pretrained(out_dir)
    # generation stops at BOS, the document separator (the model's end of text)
    GenerationConfig(bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, do_sample=False).save_pretrained(out_dir)
    shutil.copyfile(HF_MODULE, os.path.join(out_dir, "hf_model.py"))
    hf_tokenizer(tokenizer, model.config.sequence_len).save_pretrained(out_dir)
    return out_dir


def push_to_hub(out_dir, repo_id, private=False):
    """Uploads the folder to a Hub model repo (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        return api.upload_folder(folder_path=out_dir, repo_id=repo_id, repo_type="model",
                                 commit_message="nanochat export (scripts/export_hf.py)")
    except HfHubHTTPError as e:
        raise ExportError(f"upload to {repo_id} failed ({e}); the export is complete in {out_dir}: "
                          "log in (`hf auth login` or HF_TOKEN) and push it again with --push-to-hub") from None


def main(argv=None):
    args = parse_args(argv)
    run_dir = base_eval.find_run_dir(args)
    checkpoint_dir = step_dir(os.path.join(run_dir, "checkpoints"), resolve_step(os.path.join(run_dir, "checkpoints"), args.step))
    run_args = load_meta(checkpoint_dir).get("args", {})
    tokenizer = get_tokenizer(args.tokenizer_dir or run_args.get("tokenizer_dir") or None)  # the run's own by default
    out = export(checkpoint_dir, tokenizer, args.out)
    print(f"exported {checkpoint_dir} to {out}: {json.dumps(sorted(os.listdir(out)))}")
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}: {push_to_hub(out, args.push_to_hub, args.private)}")
    return out


if __name__ == "__main__":
    run_main(main, "export_hf", (CheckpointError, RunDirError, TokenizerError, ExportError))
