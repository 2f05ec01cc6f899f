"""scripts/preflight.py on CPU: the whole table at 1 and 2 ranks with its exit code, and every check forced
into its failure (wrong attention backend, SDPA's dense window masks on several GPUs, broken fp8, corrupted
collective, OOM, missing tokenizer, missing or short data, slow loader, full disk, unwritable run dir, no
wandb credentials) with a message that says what to fix."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import nanochat.attention
import nanochat.fp8
from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from scripts import preflight
from scripts.preflight import FAIL, PASS, SKIP, WARN, Row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4", "--compile", "0",
        "--num-iterations", "20", "--burst-steps", "2", "--burst-warmup-steps", "1"]
CPU = torch.device("cpu")


def run_preflight(args, tmp_path, nproc=1):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_DTYPE", "WANDB_MODE")}
    # one OpenMP thread: with two, a loaded 2-core box spin-waits (a d2 step took 1.5 s instead of 60 ms)
    env.update(NANOCHAT_BASE_DIR=str(tmp_path / "base"), HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    if nproc == 1:
        launcher = [sys.executable, "-m", "scripts.preflight"]
    else:  # "--": torchrun's own parser would take --run for an abbreviation of its --run-path
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "scripts.preflight", "--"]
    return subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def parse_table(stdout):
    """{check: (status, message)} from the printed table (columns located by the header)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("check ") and " status " in line)
    col = lines[start].index("status")
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("preflight "):
            break
        rows[line[:col].strip()] = (line[col:col + 6].strip(), line[col + 8:])
    return rows


EXPECTED_CPU = {"gpu": SKIP, "software": PASS, "compute dtype": PASS, "peak flops": PASS, "tokenizer": PASS, "run plan": PASS,
                "memory plan": PASS, "flash attention": SKIP, "attention w=64": PASS, "fp8": SKIP, "throughput": PASS, "projection": PASS,
                "data": PASS, "loader": PASS, "disk": PASS, "run dir": PASS, "wandb": PASS}


@pytest.mark.parametrize("nproc", [1, 2])
def test_cpu_table_and_exit_code(nproc, tmp_path, tokenizer_dir, corpus_dir):
    run_dir = tmp_path / "run"
    out = run_preflight(TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--run-dir", str(run_dir),
                                "--run", "preflight-test"], tmp_path, nproc)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("preflight PASS") == 1  # rank 0 prints, once
    rows = parse_table(out.stdout)
    comm = PASS if nproc > 1 else SKIP
    assert {k: s for k, (s, _) in rows.items()} == {**EXPECTED_CPU, "all_reduce": comm, "reduce_scatter": comm, "all_gather": comm}
    if nproc > 1:
        assert all("busbw" in rows[op][1] for op in ("all_reduce", "reduce_scatter", "all_gather"))
    assert f"on {nproc} x cpu" in rows["throughput"][1] and "MFU" in rows["throughput"][1]
    assert "h of training steps" in rows["projection"][1] or "min of training steps" in rows["projection"][1]
    assert os.listdir(run_dir) == []  # the write probe is gone


def test_failures_give_exit_code_1_on_every_rank(tmp_path, corpus_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_preflight(TINY + ["--tokenizer-dir", str(tmp_path / "no_tokenizer"), "--data-dir", str(empty),
                                "--run-dir", str(tmp_path / "run"), "--skip-burst"], tmp_path, nproc=2)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    rows = parse_table(out.stdout)
    assert rows["tokenizer"][0] == FAIL and "scripts.tok_train" in rows["tokenizer"][1]
    assert rows["data"][0] == FAIL and "python -m nanochat.dataset" in rows["data"][1]
    assert rows["loader"][0] == SKIP and rows["throughput"][0] == SKIP
    assert rows["run plan"][0] == PASS and "assumed: no tokenizer" in rows["run plan"][1]
    assert rows["all_reduce"][0] == PASS  # the other checks still ran
    assert "preflight FAIL: 2 FAIL" in out.stdout


# -----------------------------------------------------------------------------
# each check forced into its failure

def test_wrong_attention_backend_fails_the_short_windows(monkeypatch):
    config = GPTConfig(sequence_len=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=64, short_window=16)
    rows = preflight.check_attention_windows(CPU, torch.float32, config)
    assert [(r.check, r.status) for r in rows] == [("attention w=16", PASS), ("attention w=64", PASS)]
    assert [r.status for r in preflight.check_attention_windows(CPU, torch.bfloat16, config)] == [PASS, PASS]

    full_causal = nanochat.attention.sdpa_attention
    monkeypatch.setattr(nanochat.attention, "sdpa_attention", lambda q, k, v, window: full_causal(q, k, v, q.size(1)))
    short, full = preflight.check_attention_windows(CPU, torch.float32, config)
    assert short.status == FAIL and "reinstall torch" in short.message
    assert full.status == PASS  # ignoring the window is right only when the window is the whole context


def test_sdpa_with_windows_on_a_gpu_warns_and_fails_on_several(monkeypatch):
    """A faked H100 without FlashAttention: the row states the dense-mask cost; 8 GPUs make it a FAIL."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(nanochat.attention, "_FLASH", [(None, "no FlashAttention (kernels: ImportError)")])
    cuda = torch.device("cuda", 0)
    with torch.device("meta"):
        sssl = GPT(GPTConfig(sequence_len=2048, n_layer=4, n_head=2, n_kv_head=2, n_embd=128))
        long_only = GPT(GPTConfig(sequence_len=2048, n_layer=4, n_head=2, n_kv_head=2, n_embd=128, window_pattern="L"))
    row = preflight.check_flash_attention(cuda, torch.bfloat16, sssl, 8)[0]
    assert row.status == FAIL and "3 of 4 layers as dense 2048x2048 masks" in row.message
    assert "3.03x its FA3 FLOPs" in row.message and "or pass --window-pattern L" in row.message
    assert preflight.check_flash_attention(cuda, torch.bfloat16, sssl, 1)[0].status == WARN
    row = preflight.check_flash_attention(cuda, torch.bfloat16, long_only, 8)[0]
    assert row.status == WARN and "No sliding windows" in row.message
    monkeypatch.setattr(nanochat.attention, "_FLASH", [(object(), "fake FA3")])
    assert preflight.check_flash_attention(cuda, torch.bfloat16, sssl, 8)[0].status == PASS


def test_fp8_numerics(monkeypatch):
    assert preflight.check_fp8(CPU, False, 128)[0].status == SKIP
    row = preflight.check_fp8(CPU, True, 128)[0]
    assert row.status == PASS and "out 0.0" in row.message

    to_fp8 = nanochat.fp8._to_fp8
    monkeypatch.setattr(nanochat.fp8, "_to_fp8", lambda t, dtype: (lambda q, inv: (q, 2 * inv))(*to_fp8(t, dtype)))
    row = preflight.check_fp8(CPU, True, 128)[0]
    assert row.status == FAIL and "train without --fp8" in row.message

    monkeypatch.setattr(preflight, "fp8_supported", lambda device: (False, "CUDA SM 80 has no fp8 tensor cores; train without --fp8"))
    row = preflight.check_fp8(CPU, True, 128)[0]
    assert row.status == FAIL and "SM 80" in row.message


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_corrupted_collective_fails(one_rank_group, monkeypatch):
    assert [r.status for r in preflight.check_collectives(CPU)] == [PASS, PASS, PASS]
    gather = preflight.all_gather_single

    def off_by_one(out, inp):
        gather(out, inp)
        out[-1] += 1
    monkeypatch.setattr(preflight, "all_gather_single", off_by_one)
    rows = {r.check: r for r in preflight.check_collectives(CPU)}
    assert rows["all_gather"].status == FAIL and "NCCL_DEBUG=INFO" in rows["all_gather"].message
    assert rows["all_reduce"].status == PASS


def tiny_plan(extra=()):
    own, args = preflight.parse_args(TINY + list(extra))
    return args, preflight.check_run_plan(args, 2048, 1)


def test_memory_plan_row_fits_or_says_what_to_lower(monkeypatch):
    args = preflight.parse_args(TINY)[1]
    with torch.device("meta"):
        model = GPT(base_train_config(args))
    rows = preflight.check_memory_plan(model, args, 1, CPU, True)
    assert rows[0].status == PASS and "d2 vocab" in rows[0].message and "system RAM" in rows[0].message
    monkeypatch.setattr(preflight.memory_plan, "device_memory_bytes", lambda device: (2**30, "a 1 GiB device"))
    rows = preflight.check_memory_plan(model, args, 1, CPU, True)
    assert rows[0].status == WARN and "lower --device-batch-size" in rows[0].message
    rows = preflight.check_memory_plan(model, args, 1, torch.device("cuda"), True)
    assert rows[0].status == FAIL
    assert preflight.check_memory_plan(model, args, 2, CPU, False)[0].status == SKIP


def test_batch_auto_resolves_or_fails(monkeypatch):
    args = preflight.parse_args(TINY[:6] + ["--device-batch-size", "auto", "--total-batch-size", "1024"])[1]
    rows = preflight.resolve_auto_batch(args, 256, 1, CPU)
    assert rows[0].status == PASS and args.device_batch_size == 16  # 1024 tokens / T 64
    monkeypatch.setattr(preflight.memory_plan, "device_memory_bytes", lambda device: (2**20, "a 1 MiB device"))
    args.device_batch_size = 0
    rows = preflight.resolve_auto_batch(args, 256, 1, CPU)
    assert rows[0].status == FAIL and "not even one sequence" in rows[0].message


def base_train_config(args):
    from scripts import base_train
    return base_train.build_config(args, 256)


def test_run_plan_with_indivisible_batch_fails():
    _, (rows, plan) = tiny_plan(["--total-batch-size", "1000"])
    assert plan is None and rows[0].status == FAIL and "pick a total batch" in rows[0].message


def test_out_of_memory_in_the_burst_fails(monkeypatch):
    args, (_, (model, hp)) = tiny_plan()
    rows, rates = preflight.run_burst(args, hp, 2048, CPU, 1e11, 1, 0)
    assert rows[0].status == PASS and rates["tok_per_s_per_rank"] > 0

    def oom(self, idx, targets=None, loss_reduction="mean"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    monkeypatch.setattr(GPT, "forward", oom)
    rows, rates = preflight.run_burst(args, hp, 2048, CPU, 1e11, 1, 0)
    assert rates is None and rows[0].status == FAIL and "lower --device-batch-size" in rows[0].message


def test_missing_or_corrupt_tokenizer_fails(tmp_path, tokenizer_dir):
    rows, tok = preflight.check_tokenizer(tokenizer_dir)
    assert rows[0].status == PASS and tok is not None
    rows, tok = preflight.check_tokenizer(str(tmp_path / "nowhere"))
    assert tok is None and rows[0].status == FAIL and "python -m scripts.tok_train" in rows[0].message
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"format": "nanochat-bpe-1", "ran')
    rows, tok = preflight.check_tokenizer(str(tmp_path / "bad"))
    assert tok is None and rows[0].status == FAIL and "tok_train" in rows[0].message


def test_data_missing_unreadable_or_short(tmp_path, tokenizer, corpus_dir, write_parquet):
    empty = tmp_path / "empty"
    empty.mkdir()
    row = preflight.check_data(str(empty), tokenizer, 10**6)[0]
    assert row.status == FAIL and "python -m nanochat.dataset" in row.message and "Hugging Face Hub" in row.message

    one = tmp_path / "one"
    one.mkdir()
    write_parquet(one / "a.parquet", ["some text"] * 8)
    row = preflight.check_data(str(one), tokenizer, 10**6)[0]
    assert row.status == FAIL and "at least 2" in row.message

    broken = tmp_path / "broken"
    broken.mkdir()
    write_parquet(broken / "a.parquet", ["some text"] * 8)
    (broken / "b.parquet").write_bytes(b"PAR1 truncated download")
    row = preflight.check_data(str(broken), tokenizer, 10**6)[0]
    assert row.status == FAIL and "b.parquet" in row.message and "re-download" in row.message

    climbmix = tmp_path / "climbmix"  # named like ClimbMix: the fix is a download of N shards
    climbmix.mkdir()
    write_parquet(climbmix / "shard_00000.parquet", ["a short document about nothing much"] * 64)
    write_parquet(climbmix / "shard_06542.parquet", ["validation text"] * 8)
    row = preflight.check_data(str(climbmix), tokenizer, 10**6)[0]
    assert row.status == WARN and "repeat the data" in row.message and "python -m nanochat.dataset -n " in row.message

    assert preflight.check_data(corpus_dir, tokenizer, 10**6)[0].status == PASS
    assert preflight.check_data(corpus_dir, tokenizer, 10**9)[0].status == WARN


def test_slow_loader_warns(tokenizer, corpus_dir):
    args, _ = tiny_plan()
    row = preflight.check_loader(tokenizer, args, corpus_dir, 0, 1, CPU, 1e12)[0]
    assert row.status == WARN and "faster disk" in row.message
    assert preflight.check_loader(tokenizer, args, corpus_dir, 0, 1, CPU, 1.0)[0].status == PASS


def test_checkpoint_bytes_match_a_real_checkpoint(tmp_path):
    """The disk check's size, computed on the meta device, equals what save_checkpoint writes (within 1%)."""
    args, (_, (meta_model, hp)) = tiny_plan()
    predicted = preflight.checkpoint_bytes(meta_model, CPU)
    model, optimizer, _ = preflight.build_for_burst(args, hp, 2048, CPU)
    path = save_checkpoint(str(tmp_path), 1, model, {"optimizer": optimizer.state_dict()}, {"args": vars(args)})
    written = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    assert abs(written - predicted) / written < 0.01, (written, predicted)


def test_full_disk_and_unwritable_run_dir_fail(tmp_path):
    assert [preflight.planned_saves(e, 100) for e in (0, -1, 30, 50)] == [0, 1, 4, 2]
    assert preflight.check_disk(str(tmp_path / "run"), 2**20, 3)[0].status == PASS
    row = preflight.check_disk(str(tmp_path / "run"), 2**60, 2)[0]
    assert row.status == FAIL and "--save-every" in row.message and "--run-dir" in row.message

    a_file = tmp_path / "file"
    a_file.write_text("not a directory")  # mkdir under a regular file fails even for root
    row = preflight.check_run_dir(str(a_file / "run"), resuming=False)[0]
    assert row.status == FAIL and "pass --run-dir" in row.message

    run_dir = tmp_path / "old_run"
    (run_dir / "checkpoints" / "step_000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000010" / "meta.json").write_text(json.dumps({"files": {}}))
    row = preflight.check_run_dir(str(run_dir), resuming=False)[0]
    assert row.status == WARN and "--resume-from-step latest" in row.message
    assert preflight.check_run_dir(str(run_dir), resuming=True)[0].status == PASS


def test_wandb_modes_and_missing_credentials(tmp_path, monkeypatch):
    assert preflight.check_wandb("", True)[0].status == SKIP
    assert preflight.check_wandb("r", False)[0].status == SKIP
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert preflight.check_wandb("r", True)[0].status == PASS
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert preflight.check_wandb("r", True)[0].status == WARN
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("HOME", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    row = preflight.check_wandb("r", True)[0]
    # base_train then logs offline with one warning (report.start_wandb): a WARN, not a FAIL
    assert row.status == WARN and "wandb login" in row.message and "offline" in row.message


def test_merge_takes_the_worst_status_over_ranks():
    rank0 = [Row("data", PASS, "ok"), Row("wandb", PASS, "logged in")]
    rank1 = [Row("data", FAIL, "shard missing"), Row("wandb", SKIP, "only rank 0 logs")]
    assert preflight.merge_rows([rank0, rank1]) == [Row("data", FAIL, "rank 1: shard missing"), Row("wandb", PASS, "logged in")]
