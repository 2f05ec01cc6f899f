"""CUDA call contracts (nanochat/contracts.py): every rule refuses a deliberately wrong call, and a compiled
d2 FP8 training step, an eval and a 2-rank ZeRO-2 optimizer step run through the checked call sites.

Also the worker of the 2-rank check (gloo, CPU):
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/test_contracts.py OUT_DIR
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat import attention, contracts
from nanochat.contracts import ContractError
from nanochat.fp8 import E4M3, E5M2, _to_fp8, convert_to_fp8, disable_fp8
from nanochat.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent


def fp8_pair(M=32, K=64, N=48, dtypes=(E4M3, E4M3)):
    """(a row-major (M, K), b column-major (K, N), scale_a, scale_b): a call that satisfies every rule."""
    a, sa = _to_fp8(torch.randn(M, K), dtypes[0])
    bt, sb = _to_fp8(torch.randn(N, K), dtypes[1])
    return a, bt.t(), sa, sb


def rule_of(excinfo):
    return excinfo.value.rule


# -----------------------------------------------------------------------------
# torch._scaled_mm: one wrong call per rule

def test_scaled_mm_accepts_the_calls_fp8_makes():
    for dtypes in ((E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)):
        contracts.check_scaled_mm(*fp8_pair(dtypes=dtypes), torch.bfloat16, True)


@pytest.mark.parametrize("case, rule", [
    ("a column-major", "scaled_mm first operand is row-major"),
    ("b row-major", "scaled_mm second operand is column-major"),
    ("K not %16", "scaled_mm inner dimension divisible by 16"),
    ("N not %16", "scaled_mm second operand's dimensions divisible by 16"),
    ("e5m2 x e5m2", "scaled_mm refuses e5m2 x e5m2 (cuBLASLt)"),
    ("bf16 operand", "scaled_mm operands are fp8 (e4m3fn or e5m2)"),
    ("bf16 scale", "scaled_mm tensorwise scale_a is fp32"),
    ("scale shape", "scaled_mm tensorwise scale_b has one element"),
    ("fp8 out", "scaled_mm out_dtype is bf16, fp16 or fp32"),
])
def test_scaled_mm_rule_refuses_a_wrong_call(case, rule):
    a, b, sa, sb = fp8_pair()
    out_dtype = torch.bfloat16
    if case == "a column-major":
        a = a.t().contiguous().t()
    elif case == "b row-major":
        b = b.contiguous()
    elif case == "K not %16":
        a, b, sa, sb = fp8_pair(K=40)
    elif case == "N not %16":
        a, b, sa, sb = fp8_pair(N=40)
    elif case == "e5m2 x e5m2":
        a, b, sa, sb = fp8_pair(dtypes=(E5M2, E5M2))
    elif case == "bf16 operand":
        a = torch.randn(32, 64, dtype=torch.bfloat16)
    elif case == "bf16 scale":
        sa = sa.bfloat16()
    elif case == "scale shape":
        sb = sb.expand(48).contiguous()
    elif case == "fp8 out":
        out_dtype = E4M3
    with pytest.raises(ContractError) as excinfo:
        contracts.check_scaled_mm(a, b, sa, sb, out_dtype)
    assert rule_of(excinfo) == rule
    assert contracts.SOURCE_SCALED_MM in str(excinfo.value)


def test_cpu_kernel_accepts_what_the_enforced_call_site_refuses():
    """The reason for the contracts: the CPU _scaled_mm runs a row-major second operand that CUDA refuses."""
    a, b, sa, sb = fp8_pair()
    b_row_major = b.contiguous()
    torch._scaled_mm(a, b_row_major, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # CPU: no complaint
    with contracts.enforced(fa3=None) as calls:
        torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        with pytest.raises(ContractError, match="column-major"):
            torch._scaled_mm(a, b_row_major, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    assert calls["scaled_mm"] == 1


# -----------------------------------------------------------------------------
# FA3: one wrong call per rule, and the reference FA3 against SDPA

def qkv(B=2, T=64, H=4, Hk=2, D=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, T, H, D, generator=g).to(dtype), torch.randn(B, T, Hk, D, generator=g).to(dtype),
            torch.randn(B, T, Hk, D, generator=g).to(dtype))


@pytest.mark.parametrize("case, rule", [
    ("fp32", "FA3 dtype is fp16, bf16 or fp8 e4m3"),
    ("k fp16", "FA3 k and v have q's dtype"),
    ("strided last dim", "FA3 inputs have a contiguous last dimension"),
    ("(B, H, T, D)", "FA3 causal self-attention has q and k of one length"),
    ("v shape", "FA3 batch and key/value shapes agree"),
    ("head dim 288", "FA3 head dim <= 256"),
    ("head dim 36", "FA3 head dim is a multiple of 8"),
    ("GQA 4 vs 3", "FA3 heads of q divisible by heads of k/v (GQA)"),
    ("window int", "FA3 window_size is a (left, right) pair"),
    ("window -2", "FA3 window sizes are >= -1 (-1: unbounded)"),
    ("window float", "FA3 window sizes are ints"),
    ("window right 5", "FA3 causal=True sets window right to 0"),
    ("fp8 backward", "FA3 fp8 is forward only"),
])
def test_fa3_rule_refuses_a_wrong_call(case, rule):
    q, k, v = qkv()
    window = (15, 0)
    if case == "fp32":
        q, k, v = qkv(dtype=torch.float32)
    elif case == "k fp16":
        k = k.half()
    elif case == "strided last dim":
        q = q.transpose(1, 3).contiguous().transpose(1, 3)
    elif case == "(B, H, T, D)":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    elif case == "v shape":
        v = v[:, :32]
    elif case == "head dim 288":
        q, k, v = qkv(D=288)
    elif case == "head dim 36":
        q, k, v = qkv(D=36)
    elif case == "GQA 4 vs 3":
        q, k, v = qkv(Hk=3)
    elif case == "window int":
        window = 16
    elif case == "window -2":
        window = (-2, 0)
    elif case == "window float":
        window = (15.0, 0)
    elif case == "window right 5":
        window = (15, 5)
    elif case == "fp8 backward":
        q, k, v = (t.to(E4M3) for t in (q, k, v))
    with pytest.raises(ContractError) as excinfo:
        contracts.check_fa3(q, k, v, causal=True, window_size=window,
                            requires_grad=True if case == "fp8 backward" else None)
    assert rule_of(excinfo) == rule
    assert contracts.SOURCE_FA3 in str(excinfo.value)


@pytest.mark.parametrize("window", [1, 16, 40, 64, 1000])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_through_reference_fa3_matches_sdpa(window, heads):
    """attention() on its FA3 path (window -> (left, 0) conversion, GQA) equals SDPA, forward and gradients."""
    H, Hk = heads
    q, k, v = qkv(H=H, Hk=Hk, D=32)
    # seeded: from the global RNG, grad_out depended on which tests ran before in the worker
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)

    def run(path):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if path == "fa3":
            with contracts.enforced(fa3="reference", sdpa=False) as calls:
                out = attention.flash_attention(*leaves, window)
                out.backward(grad_out)
            assert calls["fa3"] == 1 and calls["fa3_backward"] == 1
        else:
            out = attention.sdpa_attention(*leaves, window)
            out.backward(grad_out)
        return [out.detach()] + [t.grad for t in leaves]

    # bf16: with one shared k/v head, its gradients sum four query heads' bf16 products. Over 60 grad_out draws
    # the two paths differed by up to 1.45x a 2e-2 tolerance there (5% of draws failed it); 4e-2 holds them all
    for got, want in zip(run("fa3"), run("sdpa")):
        torch.testing.assert_close(got.float(), want.float(), rtol=4e-2, atol=4e-2)


def test_reference_fa3_window_off_by_one_is_visible():
    """A (window, 0) tuple instead of (window - 1, 0) is a legal call that attends one key too many:
    the numbers, not the contract, must catch it, and they do."""
    q, k, v = qkv(H=2, Hk=2, D=32)
    right = contracts.fa3_band_attention(q, k, v, *contracts.fa3_window(16, 64))
    off_by_one = contracts.fa3_band_attention(q, k, v, 16, 0)
    assert (right.float() - off_by_one.float()).abs().max() > 0.05
    torch.testing.assert_close(right, attention.sdpa_attention(q, k, v, 16), rtol=2e-2, atol=2e-2)


# -----------------------------------------------------------------------------
# SDPA on CUDA: flash or efficient, never math

def test_sdpa_calls_of_nanochat_reach_a_fused_backend():
    B, H, T, D = 2, 4, 64, 128
    q = torch.randn(B, H, T, D, dtype=torch.bfloat16)
    contracts.check_sdpa(q, q, q, is_causal=True)                               # long window: flash
    mask = attention.band_mask(T, 16, "cpu")
    assert contracts.sdpa_fused_backends(q, q, q, attn_mask=mask)["efficient"] is None  # sliding window: efficient
    kv = torch.randn(B, 2, T, D, dtype=torch.bfloat16)
    contracts.check_sdpa(q, kv, kv, is_causal=True, enable_gqa=True)           # GQA long window: flash


@pytest.mark.parametrize("case, why", [
    ("GQA + band mask", "grouped-query heads"),
    ("strided", "last dimension is strided"),
    ("fp8", "dtype"),
])
def test_sdpa_rule_refuses_a_math_fallback(case, why):
    B, H, T, D = 2, 4, 64, 64
    q = torch.randn(B, H, T, D, dtype=torch.bfloat16)
    k = v = q
    mask = None
    if case == "GQA + band mask":
        k = v = torch.randn(B, 2, T, D, dtype=torch.bfloat16)
        mask = attention.band_mask(T, 16, "cpu")
    elif case == "strided":
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif case == "fp8":
        q = k = v = q.to(E4M3)
    with pytest.raises(ContractError, match="SDPA reaches flash or efficient attention on CUDA") as excinfo:
        contracts.check_sdpa(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=k.size(1) != q.size(1))
    assert why in str(excinfo.value)


def test_sdpa_path_of_a_bf16_model_is_checked():
    """The SDPA path of the GPT (as on a GPU without FA3) in bf16: every call reaches a fused backend."""
    model = GPT.build(GPTConfig.from_depth(2, vocab_size=256, sequence_len=64, head_dim=64), "cpu", seed=0,
                      compute_dtype=torch.bfloat16)
    idx = torch.randint(256, (2, 64))
    with contracts.enforced(fa3=None) as calls:
        model(idx, idx).backward()
    assert calls["sdpa"] == 2  # one per layer; the windows S (band mask) and L (is_causal)


# -----------------------------------------------------------------------------
# collectives

@pytest.mark.parametrize("case, rule", [
    ("unequal shards", "reduce_scatter input is world_size equal shards of the output"),
    ("dtype", "reduce_scatter input and output share a dtype"),
    ("non-contiguous", "NCCL tensors are dense and contiguous"),
    ("fp8", "NCCL reduces no float8"),
])
def test_reduce_scatter_rule_refuses_a_wrong_call(case, rule):
    out, inp = torch.empty(3, 8), torch.randn(6, 8)
    if case == "unequal shards":
        inp = torch.randn(7, 8)
    elif case == "dtype":
        out = out.bfloat16()
    elif case == "non-contiguous":
        inp = torch.randn(8, 6).t()
    elif case == "fp8":
        out, inp = out.to(E4M3), inp.to(E4M3)
    with pytest.raises(ContractError) as excinfo:
        contracts.check_reduce_scatter(out, inp, world_size=2)
    assert rule_of(excinfo) == rule


@pytest.mark.parametrize("case, rule", [
    ("unequal shards", "all_gather output is world_size equal shards of the input"),
    ("dtype", "all_gather input and output share a dtype"),
    ("non-contiguous", "NCCL tensors are dense and contiguous"),
])
def test_all_gather_rule_refuses_a_wrong_call(case, rule):
    out, inp = torch.empty(6, 8), torch.randn(3, 8)
    if case == "unequal shards":
        out = torch.empty(7, 8)
    elif case == "dtype":
        inp = inp.bfloat16()
    elif case == "non-contiguous":
        inp = torch.randn(8, 6)[:, :3].t()
    with pytest.raises(ContractError) as excinfo:
        contracts.check_all_gather(out, inp, world_size=2)
    assert rule_of(excinfo) == rule


def two_rank_worker(out_dir):
    """One ZeRO-2 optimizer step of a d2 GPT on 2 gloo ranks through the checked collectives; then a wrong call."""
    from nanochat.common import cleanup_dist, init_dist
    info = init_dist("cpu")
    model = GPT.build(GPTConfig.from_depth(2, vocab_size=256, sequence_len=32, head_dim=32), "cpu", seed=0)
    optimizer = model.setup_optimizer(compiled=False)
    idx = torch.randint(256, (2, 32), generator=torch.Generator().manual_seed(info.rank))
    model(idx, idx).backward()
    with contracts.enforced(fa3=None, sdpa=False) as calls:
        optimizer.step()
        counted = dict(calls)
        from nanochat import optim
        try:  # a shard one row short: the contract refuses it before gloo sees it
            optim.reduce_scatter_single(torch.empty(3, 8), torch.randn(7, 8), op=torch.distributed.ReduceOp.AVG)
            refused = ""
        except ContractError as e:
            refused = str(e)
    with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as f:
        json.dump({"calls": counted, "refused": refused}, f)
    cleanup_dist()


def test_two_rank_zero2_step_goes_through_checked_collectives(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "test_contracts.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # d2, head_dim 32: 4 muon shapes (reduce-scattered, gathered); wte, lm_head, 1 value embedding
        # sharded by rows; the scalars all-reduced
        assert result["calls"]["reduce_scatter"] >= 4 and result["calls"]["all_gather"] >= 4, result
        assert result["calls"]["all_reduce"] >= 1, result
        assert result["refused"].startswith("reduce_scatter input is world_size equal shards of the output"), result


# -----------------------------------------------------------------------------
# a compiled d1 FP8 training step and an eval through every checked call site (d1 at width 128: every kind of
# fp8 layer at about half d2's cold compile)

def test_compiled_fp8_step_and_eval_go_through_the_contracts():
    """Under torch.compile the checks still see the calls: _scaled_mm inside nanochat::fp8_scaled_mm and the
    reference FA3 are custom ops whose bodies run eagerly, so the counts are the real calls (3 per fp8 layer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    try:
        config = GPTConfig.from_depth(1, vocab_size=512, sequence_len=64, aspect_ratio=128)
        with contracts.enforced(fa3="reference") as calls:
            model = GPT.build(config, "cpu", seed=0, compute_dtype=torch.bfloat16)
            n_fp8 = convert_to_fp8(model)
            compiled = torch.compile(model, dynamic=False)
            pair = torch.randint(512, (2, 2, 64), generator=torch.Generator().manual_seed(0))
            loss = compiled(pair[0], pair[1])
            loss.backward()
            train_calls = dict(calls)
            with torch.no_grad(), disable_fp8(model):
                losses = compiled(pair[0], pair[1], loss_reduction="none")
        assert n_fp8 == 6 and torch.isfinite(loss) and torch.isfinite(losses).all()
        assert train_calls == {"scaled_mm": 3 * n_fp8, "fa3": 1, "fa3_backward": 1}, train_calls
        assert calls["fa3"] == 2 and calls["scaled_mm"] == 3 * n_fp8  # eval: FA3 again, no fp8
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


if __name__ == "__main__":
    two_rank_worker(sys.argv[1])
