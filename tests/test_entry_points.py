"""Every entry point turns bad flags and bad files into one line on stderr that says what to do, exit code != 0,
no traceback; an unexpected exception (a bug) still shows its traceback.

The cases the issue names run as real command lines (subprocesses, started together by one fixture: each
pays ~3 s of torch import). Every other case runs the module's `__main__` block in this process with
runpy, which is the command line minus the interpreter start; flag ranges are audited through parse_args.
"""

import json
import re
import os
import runpy
import subprocess
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from eval_helpers import write_test_bundle
from nanochat.cli import run_main
from nanochat.dataset import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4", "--compile", "0",
        "--eval-every", "-1", "--eval-tokens", "512", "--core-metric-every", "0", "--sample-every", "0",
        "--total-batch-size", "512", "--num-iterations", "2", "--device-type", "cpu"]


def write_files(root, tokenizer_dir):
    """The bad inputs on disk: a damaged tokenizer, garbage parquet, an escaping zip, a garbage log, a bad checkpoint."""
    paths = {"root": str(root), "tokenizer": tokenizer_dir}
    bad_tok = root / "bad_tokenizer"
    bad_tok.mkdir()
    (bad_tok / "tokenizer.json").write_text('{"format": "nanochat-bpe-1", "ranks": ["YQ==", ')  # cut off mid-file
    garbage = root / "garbage_data"
    garbage.mkdir()
    for name in ("a.parquet", "b.parquet"):
        (garbage / name).write_bytes(b"this is not parquet" * 10)
    bundle = write_test_bundle(root / "bundle")
    with zipfile.ZipFile(root / "evil.zip", "w") as zf:
        for dirpath, _, files in os.walk(bundle):
            for name in files:
                zf.write(os.path.join(dirpath, name), os.path.join("eval_bundle", os.path.relpath(os.path.join(dirpath, name), bundle)))
        zf.writestr("../evil", "pwned")
    run = root / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 0, "val/bpb": 2.0}\n{"step": 1, "val/b')  # a log cut off mid-line
    good = root / "good_run"
    good.mkdir()
    (good / "log.jsonl").write_text('{"step": 0, "val/bpb": 2.0}\n')
    step = root / "bad_ckpt" / "checkpoints" / "step_000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"files": {}, "model_config": {"n_layer": 2, "no_such_field": 1}}))
    (root / "a_file").write_text("x")
    paths.update(bad_tok=str(bad_tok), garbage=str(garbage), evil_zip=str(root / "evil.zip"), run=str(run),
                 good_run=str(good), bad_ckpt=str(root / "bad_ckpt"), file=str(root / "a_file"), missing=str(root / "nope"))
    return paths


# id: (module, args with {placeholders}, a piece of the one line); the cases run as subprocesses
SUBPROCESS_CASES = ("base_train device-batch-size 0", "base_train max-seq-len 0", "base_train corrupt tokenizer.json",
                    "base_train eval bundle zip with ../")
CASES = {
    "base_train device-batch-size 0": ("scripts.base_train", TINY + ["--device-batch-size", "0"],
                                       "argument --device-batch-size: got 0, expected an integer >= 1"),
    "base_train max-seq-len 0": ("scripts.base_train", TINY + ["--max-seq-len", "0"],
                                 "argument --max-seq-len: got 0, expected an integer >= 1"),
    "base_train corrupt tokenizer.json": ("scripts.base_train", TINY + ["--tokenizer-dir", "{bad_tok}", "--data-dir", "{corpus}"],
                                          "tokenizer.json is not a valid tokenizer file"),
    "base_train eval bundle zip with ../": ("scripts.base_train", TINY + [
        "--tokenizer-dir", "{tokenizer}", "--data-dir", "{corpus}", "--core-metric-every", "-1", "--eval-bundle", "{evil_zip}"],
        "member '../evil' would land outside"),
    "base_train garbage parquet": ("scripts.base_train", TINY + ["--tokenizer-dir", "{tokenizer}", "--data-dir", "{garbage}"],
                                   "is not a readable parquet file"),
    "base_train run-dir is a file": ("scripts.base_train", TINY + ["--run-dir", "{file}"], "is a file, not a directory"),
    "base_eval step abc": ("scripts.base_eval", ["--step", "abc"], "--step takes a checkpoint step number or 'latest'"),
    "base_eval no checkpoint": ("scripts.base_eval", ["--run-dir", "{good_run}", "--device-type", "cpu"], "no complete checkpoint under"),
    "base_eval no such run dir": ("scripts.base_eval", ["--run-dir", "{missing}", "--device-type", "cpu"], "nope does not exist"),
    "base_eval unknown run name": ("scripts.base_eval", ["--run", "my-run", "--device-type", "cpu"],
                                   "no run 'my-run': "),
    "base_eval no run yet": ("scripts.base_eval", ["--depth", "2", "--device-type", "cpu"], "no run of depth 2 under"),
    "base_eval run and run-dir": ("scripts.base_eval", ["--run", "a", "--run-dir", "{good_run}"], "pass --run NAME or --run-dir PATH, not both"),
    "compare_runs the same run twice": ("scripts.compare_runs", ["{good_run}", "{good_run}/log.jsonl", "--out", "{root}/c.png"],
                                        "are the same run"),
    "base_eval bad meta.json": ("scripts.base_eval", ["--run-dir", "{bad_ckpt}", "--tokenizer-dir", "{tokenizer}", "--data-dir",
                                                      "{corpus}", "--skip-core", "--device-type", "cpu"],
                                "meta.json holds no valid model_config"),
    "base_eval corrupt tokenizer.json": ("scripts.base_eval", ["--run-dir", "{bad_ckpt}", "--tokenizer-dir", "{bad_tok}",
                                                               "--device-type", "cpu"], "is not a valid tokenizer file"),
    "tok_train vocab-size 100": ("scripts.tok_train", ["--vocab-size", "100"], "argument --vocab-size: got 100, expected an integer in [257,"),
    "tok_train missing data dir": ("scripts.tok_train", ["--data-dir", "{missing}", "--output-dir", "{root}/tok"], "does not exist"),
    "tok_train garbage parquet": ("scripts.tok_train", ["--data-dir", "{garbage}", "--output-dir", "{root}/tok"],
                                  "is not a readable parquet file"),
    "tok_eval max-chars 0": ("scripts.tok_eval", ["--max-chars", "0"], "argument --max-chars: got 0, expected an integer >= 1"),
    "tok_eval corrupt tokenizer.json": ("scripts.tok_eval", ["--tokenizer-dir", "{bad_tok}", "--data-dir", "{corpus}"],
                                        "is not a valid tokenizer file"),
    "preflight burst-steps 0": ("scripts.preflight", ["--burst-steps", "0"], "argument --burst-steps: got 0, expected an integer >= 1"),
    "preflight device-batch-size 0": ("scripts.preflight", ["--device-batch-size", "0"], "argument --device-batch-size: got 0"),
    "compare_runs one run": ("scripts.compare_runs", ["{good_run}"], "give at least two runs to compare"),
    "compare_runs garbage log.jsonl": ("scripts.compare_runs", ["{run}", "{good_run}", "--out", "{root}/c.png"],
                                       "log.jsonl cannot be read"),
    "compare_runs out dir missing": ("scripts.compare_runs", ["{good_run}", "{good_run}", "--out", "{missing}/c.png"],
                                     "pass a PNG path in an existing directory"),
    "sweep no tokenizer": ("scripts.sweep", ["--out", "{root}/sweep", "--depths", "2", "--seeds", "1", "--change",
                                             "x: --matrix-lr 0.04", "--dry-run"], "no tokenizer at"),
    "dataset -n 0": ("nanochat.dataset", ["-n", "0"], "argument -n/--num-shards: got 0, expected an integer in [1, 6542]"),
    "dataset data-dir is a file": ("nanochat.dataset", ["-n", "1", "--data-dir", "{file}"], "is a file, not a directory"),
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tokenizer_dir, corpus_dir):
    return {**write_files(tmp_path_factory.mktemp("entry_points"), tokenizer_dir), "corpus": corpus_dir}


@pytest.fixture(scope="module")
def outcomes(paths):
    """{case id: CompletedProcess} of SUBPROCESS_CASES, run together with a scratch base dir and no network."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_DATA_DIR")}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=os.path.join(paths["root"], "base"),
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled")

    def run(case):
        module, args, _ = CASES[case]
        cmd = [sys.executable, "-m", module] + [a.format(**paths) for a in args]
        return case, subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    with ThreadPoolExecutor(max_workers=len(SUBPROCESS_CASES)) as pool:
        return dict(pool.map(run, SUBPROCESS_CASES))


def run_in_process(module, argv, monkeypatch, capsys):
    """(exit code, stderr) of `python -m module argv` run by runpy in this process: its __main__ block included."""
    monkeypatch.setattr(sys, "argv", [module] + argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (this test imported it)
        with pytest.raises(SystemExit) as e:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):  # what the interpreter does with SystemExit("message"): print it, exit 1
        code, err = 1, err + code + "\n"
    return code, err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, paths, outcomes, monkeypatch, capsys, tmp_path):
    module, args, expected = CASES[case]
    if case in SUBPROCESS_CASES:
        proc = outcomes[case]
        code, err = proc.returncode, proc.stderr
    else:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_DATA_DIR"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        code, err = run_in_process(module, [a.format(**paths) for a in args], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None), err[-3000:]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert expected in lines[0], lines[0]
    print(f"{case}: {lines[0]}")  # `pytest -s` prints the table of one-liners


def test_escaping_zip_wrote_nothing_outside(paths, outcomes):
    assert outcomes["base_train eval bundle zip with ../"].returncode != 0
    root = paths["root"]
    base = os.path.join(root, "base")
    assert not os.path.exists(os.path.join(root, "evil")) and not os.path.exists(os.path.join(base, "evil"))
    installed = os.listdir(base) if os.path.isdir(base) else []
    assert not [d for d in installed if d.startswith("eval_bundle")]


def test_entry_points_and_a_built_model_do_not_import_dynamo():
    """torch._dynamo's import is ~1.9 s of a process's start-up on a 2-core CPU (dev/LOG.md 2026-12-03): the
    entry points, the optimizer module and a built model leave it to torch.compile and torch.optim to pull in."""
    code = ("import sys, scripts.base_train, scripts.sample, scripts.export_hf, scripts.base_eval, scripts.preflight, "
            "nanochat.optim; from nanochat.gpt import GPT, GPTConfig; "
            "GPT.build(GPTConfig.from_depth(1, vocab_size=64, sequence_len=16), 'cpu', seed=0); "
            "print([m for m in sys.modules if m.startswith('torch._dynamo')])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout[-2000:] + result.stderr[-2000:]


def test_an_unexpected_error_keeps_its_traceback():
    """run_main catches only the named bad-input types: a bug is not dressed up as a user error."""
    def buggy():
        return {}["missing"]

    def bad_file():
        raise DataError("a.parquet is not a readable parquet file:\nre-download it")
    with pytest.raises(KeyError):
        run_main(buggy, "x", (DataError,))
    with pytest.raises(SystemExit) as e:
        run_main(bad_file, "x", (DataError,))
    assert e.value.code == 1


# -----------------------------------------------------------------------------
# the flag audit, in-process: every numeric flag refuses values that would crash or mean nothing

def parse_error(parse, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


BASE_TRAIN_BAD = [["--depth", "0"], ["--aspect-ratio", "0"], ["--head-dim", "-8"], ["--head-dim", "33"],
                  ["--max-seq-len", "0"], ["--device-batch-size", "-1"], ["--total-batch-size", "0"],
                  ["--num-iterations", "0"], ["--target-flops", "0"], ["--target-param-data-ratio", "0"],
                  ["--matrix-lr", "-0.1"], ["--embedding-lr", "inf"], ["--unembedding-lr", "nan"], ["--scalar-lr", "x"],
                  ["--weight-decay", "-0.5"], ["--warmup-steps", "-2"], ["--warmdown-frac", "1.5"],
                  ["--final-lr-frac", "-0.1"], ["--compile", "2"], ["--eval-every", "-2"], ["--eval-tokens", "0"],
                  ["--core-metric-every", "-5"], ["--core-metric-max-per-task", "0"], ["--sample-every", "-3"],
                  ["--save-every", "-2"], ["--resume-from-step", "last"], ["--window-pattern", ""],
                  ["--window-pattern", "SXL"], ["--seed", "-1"], ["--device-type", "tpu"], ["--fp8", "--compile", "0"]]


@pytest.mark.parametrize("argv", BASE_TRAIN_BAD, ids=" ".join)
def test_base_train_flag_audit(argv, capsys):
    from scripts.base_train import parse_args
    err = parse_error(parse_args, argv, capsys)
    assert argv[0] in err or (argv[0] == "--fp8" and "--fp8 needs --compile 1" in err)


def test_base_train_sentinels_and_defaults_parse():
    from scripts.base_train import parse_args
    args = parse_args(["--num-iterations", "-1", "--total-batch-size", "-1", "--weight-decay", "-1", "--eval-every", "-1",
                       "--core-metric-every", "0", "--save-every", "0", "--resume-from-step", "latest", "--run", "r"])
    assert (args.num_iterations, args.weight_decay, args.core_metric_every) == (-1, -1.0, 0)
    assert parse_args([]).device_batch_size == 32 and parse_args(["--resume-from-step", "12", "--run", "r"]).resume_from_step == "12"


@pytest.mark.parametrize("module,argv", [
    ("scripts.base_eval", ["--depth", "0"]), ("scripts.base_eval", ["--max-per-task", "0"]),
    ("scripts.base_eval", ["--bpb-tokens", "0"]), ("scripts.base_eval", ["--device-batch-size", "0"]),
    ("scripts.base_eval", ["--num-sample-tokens", "-1"]), ("scripts.base_eval", ["--step", "-3"]),
    ("scripts.tok_train", ["--vocab-size", "256"]), ("scripts.tok_train", ["--max-chars", "0"]),
    ("scripts.tok_train", ["--doc-cap", "-1"]), ("scripts.tok_eval", ["--max-chars", "-5"]),
    ("scripts.compare_runs", ["a", "b", "--noise-sigmas", "-1"]), ("scripts.compare_runs", ["a", "b", "--mfu-skip-steps", "-1"]),
    ("scripts.preflight", ["--gpu-hour-usd", "-3"]), ("scripts.preflight", ["--burst-warmup-steps", "-1"]),
    ("nanochat.dataset", ["-w", "0"]), ("nanochat.dataset", ["-n", "7000"]),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_other_entry_points_flag_audit(module, argv, capsys):
    import importlib
    mod = importlib.import_module(module)
    parse = mod.main if module == "nanochat.dataset" else mod.parse_args  # dataset's main parses before it downloads
    err = parse_error(parse, argv, capsys)
    assert argv[-2] in err or argv[0] in err


# -----------------------------------------------------------------------------
# one --help style: every entry point answers --help, and every option shows its default exactly once

def entry_points():
    """Every module with a __main__ block: scripts/*.py and the package's own (nanochat.dataset)."""
    found = []
    for package in ("scripts", "nanochat"):
        for name in sorted(os.listdir(os.path.join(REPO, package))):
            if name.endswith(".py") and '__name__ == "__main__"' in open(os.path.join(REPO, package, name)).read():
                found.append(f"{package}.{name[:-3]}")
    return found


def help_options(text):
    """[(invocation, help)] of the options in argparse's --help text ('--run RUN', '-h, --help', ...)."""
    entries, current = [], None
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if m:
            current = [m.group(1), m.group(2) or ""]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current[1] += " " + line.strip()
        else:
            current = None
    return [tuple(e) for e in entries]


def help_problems(text):
    """What breaks the one help style, one string per problem (empty: none)."""
    usage = text.split("\n\n")[0]
    problems = [f"empty default: {line.strip()}" for line in text.splitlines() if "(default: )" in line]
    for invocation, help in help_options(text):
        flag = all(" " not in part for part in invocation.split(", "))
        required = any(re.search(rf"(?:^|\s){re.escape(part.split()[0])}\s", usage) for part in invocation.split(", "))
        mentions = len(re.findall(r"default:", help, re.IGNORECASE))
        shown = len(re.findall(r"\(default: [^)\s]", help))
        if flag or required:
            if re.search(r"\(default: (False|None)\)", help) or mentions > 1:
                problems.append(f"{invocation}: a flag/required option with a meaningless default: {help}")
        elif not (mentions == 1 and shown == 1):
            problems.append(f"{invocation}: {shown} '(default: ...)' and {mentions} 'default:' (want exactly one): {help}")
    return problems


@pytest.mark.parametrize("module", entry_points())
def test_help_shows_every_default_once(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    monkeypatch.setenv("COLUMNS", "120")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (this test imported it)
        with pytest.raises(SystemExit) as e:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert e.value.code in (0, None) and out.startswith("usage:"), f"exit {e.value.code}, stdout: {out[:500]}"
    assert help_options(out), out  # the parser above read the options (at least -h)
    problems = help_problems(out)
    assert not problems, "\n".join(problems)


def test_help_problems_are_seen():
    """The checker on argparse's own doubled output and a default left out."""
    doubled = ("usage: x [-h] [--a A] [--b B] --c C [--d]\n\noptions:\n  -h, --help  show this help message and exit\n"
               "  --a A       a dir (default: <base>/a) (default: )\n  --b B       a count\n"
               "  --c C       required (default: None)\n  --d         a flag (default: False)\n")
    problems = help_problems(doubled)
    assert len(problems) == 5, problems  # the empty default, --a twice, --b none, --c and --d meaningless
    good = "usage: x [-h] [--a A] --c C\n\noptions:\n  -h, --help  show this help message and exit\n  --a A       a dir\n" \
           "              (default: <base>/a)\n  --c C       required\n"
    assert help_problems(good) == []
