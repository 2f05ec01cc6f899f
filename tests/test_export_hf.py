"""scripts/export_hf.py: a checkpoint -> a folder transformers loads offline, computing exactly what gpt.py does.

- the tokenizer.json encodes a corpus sample to nanochat's ids (and decodes back), BOS prepended;
- logits of the loaded model equal GPT's (fp32, <= 1e-5 relative) on sequences longer than the short
  window, for a checkpoint trained by base_train and for one whose every parameter is perturbed (so
  smear, backout, value embeddings and the lambdas all matter) with grouped-query heads;
- greedy `generate()` through transformers' cache gives GPT.generate's tokens, also for a left-padded batch;
- --push-to-hub uploads the folder to a local fake Hub.
The transformers side runs in a subprocess with HF_HUB_OFFLINE=1, as a user's offline load would.
"""

import base64
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("transformers", reason="pip install -e '.[hf]'")

from nanochat.checkpoint import save_checkpoint  # noqa: E402
from nanochat.dataset import iter_documents, list_parquet_files, split_files  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 256  # short window 128: the test sequences and generations run past it
TRAIN = ["--depth", "2", "--head-dim", "32", "--max-seq-len", str(SEQ_LEN), "--device-batch-size", "2",
         "--total-batch-size", str(2 * SEQ_LEN), "--num-iterations", "4", "--warmup-steps", "1", "--compile", "0",
         "--eval-every", "-1", "--eval-tokens", "512", "--core-metric-every", "0", "--sample-every", "0", "--device-type", "cpu"]

# what a user does with the folder, offline: load, score, generate greedily; results saved for the test
HF_SIDE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, seqs_path, out_path = sys.argv[1:4]
job = json.load(open(seqs_path))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(folder)
out = {"dtype": str(model.dtype), "encoded": tok(job["text"])["input_ids"]}
with torch.no_grad():
    out["logits"] = model(torch.tensor(job["seqs"])).logits
    out["greedy"] = [model.generate(torch.tensor([p]), max_new_tokens=job["new"], do_sample=False)[0, len(p):].tolist()
                     for p in job["prompts"]]
    width = max(len(p) for p in job["prompts"])  # one left-padded batch of all prompts
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in job["prompts"]])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in job["prompts"]])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=job["new"], do_sample=False)[:, width:]
    out["batched"] = batch.tolist()
torch.save(out, out_path)
"""


def hf_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"}


def run_hf_side(folder, job, tmp_path):
    job_path, out_path = tmp_path / "job.json", tmp_path / "hf_out.pt"
    job_path.write_text(json.dumps(job))
    result = subprocess.run([sys.executable, "-c", HF_SIDE, str(folder), str(job_path), str(out_path)], cwd=REPO,
                            env=hf_env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out_path)


def corpus_text(corpus_dir, n_docs, split=1):
    docs = []
    for text in iter_documents(split_files(list_parquet_files(corpus_dir))[split]):
        docs.append(text)
        if len(docs) == n_docs:
            return docs
    return docs


def train_checkpoint(run_dir, tokenizer_dir, corpus_dir):
    """A d2 model (T 256) trained 4 steps by base_train; returns its checkpoint directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_DTYPE")}
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *TRAIN, "--tokenizer-dir", tokenizer_dir,
                             "--data-dir", corpus_dir, "--run-dir", str(run_dir)], cwd=REPO, capture_output=True, text=True,
                            env={**env, "NANOCHAT_BASE_DIR": str(run_dir), "OMP_NUM_THREADS": "2"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return os.path.join(run_dir, "checkpoints", "step_000004")


def export_cli(run_dir, tokenizer_dir, out):
    return subprocess.run([sys.executable, "-m", "scripts.export_hf", "--run-dir", str(run_dir), "--tokenizer-dir",
                           tokenizer_dir, "--out", str(out)], cwd=REPO, env=hf_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory, tokenizer_dir, corpus_dir):
    """(checkpoint dir, export folder) of a base_train checkpoint, exported with the command line."""
    root = tmp_path_factory.mktemp("hf_export")
    checkpoint = train_checkpoint(root / "run", tokenizer_dir, corpus_dir)
    result = export_cli(root / "run", tokenizer_dir, root / "hf")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return checkpoint, root / "hf"


def perturbed_checkpoint(root, sequence_len=SEQ_LEN, norm_gains=False):
    """GQA (2 heads, 1 kv head), every parameter moved off its init: zero-init projections, smear_lambda 0,
    unit resid lambdas (and unit norm gains) would each hide a mechanism from the comparison."""
    config = GPTConfig(sequence_len=sequence_len, vocab_size=2048, n_layer=3, n_head=2, n_kv_head=1, n_embd=64,
                       norm_gains=norm_gains)
    model = GPT.build(config, torch.device("cpu"), seed=0, compute_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return save_checkpoint(str(root / "checkpoints"), 1, model, {}, {"model_config": config.to_dict()})


def load_ours(checkpoint_dir):
    from scripts.base_eval import load_model
    model, _ = load_model(checkpoint_dir, torch.device("cpu"))
    return model


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def check_export(checkpoint_dir, folder, tokenizer, corpus_dir, tmp_path):
    model = load_ours(checkpoint_dir)
    assert model.compute_dtype == torch.float32
    docs = corpus_text(corpus_dir, 40)
    stream = [t for d in docs for t in tokenizer.encode(d, prepend_bos=True)]
    seqs = [stream[:SEQ_LEN], stream[SEQ_LEN:2 * SEQ_LEN]]
    prompts = [stream[3 * SEQ_LEN:3 * SEQ_LEN + 150], stream[5000:5000 + 90], tokenizer.encode(docs[3][:300], prepend_bos=True)]
    new = 80  # 150 + 80 tokens: past the 128-key window
    hf = run_hf_side(folder, {"seqs": seqs, "prompts": prompts, "new": new, "text": docs[0]}, tmp_path)
    assert hf["dtype"] == "torch.float32"
    assert hf["encoded"] == tokenizer.encode(docs[0], prepend_bos=True)
    with torch.no_grad():
        ours = model(torch.tensor(seqs))
    assert hf["logits"].shape == ours.shape == (2, SEQ_LEN, tokenizer.vocab_size)
    assert relative_error(hf["logits"], ours) <= 1e-5
    for prompt, greedy, batched in zip(prompts, hf["greedy"], hf["batched"]):
        expected = list(model.generate(prompt, new))
        if tokenizer.bos_token_id in expected:  # transformers stops at BOS (eos_token_id), ours runs on
            expected = expected[:expected.index(tokenizer.bos_token_id) + 1]
        assert greedy == expected
        assert batched[:len(expected)] == expected and set(batched[len(expected):]) <= {tokenizer.bos_token_id}
    return hf


def test_tokenizer_json_encodes_like_ours(tokenizer, corpus_dir):
    from scripts.export_hf import hf_tokenizer
    hf = hf_tokenizer(tokenizer)
    docs = corpus_text(corpus_dir, 300) + ["digits 1234567 and 'll 've\r\n\n  spaces\t\ttabs", "é中文🙂 <|bos|> text", ""]
    n_tokens = 0
    for doc in docs:
        ours = tokenizer.encode(doc)
        assert hf(doc, add_special_tokens=False)["input_ids"] == ours, doc[:200]
        assert hf(doc)["input_ids"] == [tokenizer.bos_token_id] + ours  # BOS as nanochat prepends it
        assert hf.decode(ours) == doc
        n_tokens += len(ours)
    assert n_tokens > 100_000  # a real sample, not a handful of words
    assert hf.bos_token_id == hf.eos_token_id == tokenizer.bos_token_id


def test_trained_checkpoint_exports_exactly(trained_export, tokenizer, corpus_dir, tmp_path):
    checkpoint, folder = trained_export
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "hf_model.py", "model.safetensors",
                                          "tokenizer.json", "tokenizer_config.json"]
    config = json.load(open(folder / "config.json"))
    assert config["window_sizes"] == [128, SEQ_LEN] and config["auto_map"]["AutoModelForCausalLM"].startswith("hf_model.")
    check_export(checkpoint, folder, tokenizer, corpus_dir, tmp_path)


def test_every_mechanism_exports_exactly(tmp_path, tokenizer, corpus_dir):
    """Every mechanism perturbed away from its init, --norm-gains on; the trained export above covers the model
    without gains (one transformers process less: ~20 s of the suite)."""
    from scripts.export_hf import export
    checkpoint = perturbed_checkpoint(tmp_path / "run", norm_gains=True)
    folder = export(checkpoint, tokenizer, str(tmp_path / "hf"))
    hf = check_export(checkpoint, folder, tokenizer, corpus_dir, tmp_path)
    assert len(set(map(tuple, hf["greedy"]))) == 3  # the prompts lead somewhere different: not a degenerate model


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, tokenizer_dir):
    result = export_cli(tmp_path / "nope", tokenizer_dir, tmp_path / "hf")  # no such run
    assert result.returncode == 1 and "export_hf: no run" in result.stderr and "pass --run NAME or --run-dir" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "hf")
    (tmp_path / "empty").mkdir()  # a run dir without a complete checkpoint
    result = export_cli(tmp_path / "empty", tokenizer_dir, tmp_path / "hf")
    assert result.returncode == 1 and "export_hf: no complete checkpoint under" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "hf")


class FakeHub:
    """The Hub endpoints upload_folder uses (create repo, preupload, commit), answering 'regular' upload mode
    so every file arrives base64-encoded inside the commit; files land in self.files."""

    def __init__(self):
        hub, self.files, self.repos = self, {}, []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, payload):
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.repos.append(f"{request.get('organization') or 'user'}/{request['name']}")
                    return self._reply({"url": f"{hub.url}/{hub.repos[-1]}"})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "file":
                            hub.files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply({"commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_push_to_hub_uploads_the_folder(trained_export, tmp_path):
    _, folder = trained_export
    hub = FakeHub()
    code = ("import sys; from scripts.export_hf import push_to_hub; "
            f"print(push_to_hub({str(folder)!r}, 'user/nanochat-test'))")
    env = {**hf_env(), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_fake", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_XET": "1"}
    try:
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    finally:
        hub.server.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert hub.repos == ["user/nanochat-test"]
    assert {name: data for name, data in hub.files.items()} == {name: open(folder / name, "rb").read()
                                                                 for name in os.listdir(folder)}
