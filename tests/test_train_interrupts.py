"""base_train interrupted on purpose: SIGTERM/SIGINT at 1 and 2 ranks (save, resume command, resume),
a corrupted checkpoint refused in one line, a real full filesystem (tmpfs in a user namespace, where allowed)."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from nanochat.checkpoint import list_steps, step_dir
from tests.test_checkpoint import overwrite_middle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4",
        "--compile", "0", "--eval-every", "-1", "--eval-tokens", "512", "--core-metric-every", "0",
        "--sample-every", "0", "--warmup-steps", "2", "--total-batch-size", "512"]
TIMEOUT_S = 300
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def env_for(base_dir, nproc):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NANOCHAT_DTYPE")}
    env.update({"NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1" if nproc > 1 else "2", "PYTHONPATH": REPO})
    return env


class Run:
    """A base_train process whose merged output is read line by line, so a test can act at a given line."""

    def __init__(self, command, base_dir, nproc):
        self.proc = subprocess.Popen(command, cwd=REPO, env=env_for(base_dir, nproc), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []
        self.watchdog = threading.Timer(TIMEOUT_S, lambda: os.killpg(self.proc.pid, signal.SIGKILL))
        self.watchdog.start()

    def wait_for(self, pattern):
        for line in self.proc.stdout:
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"never printed {pattern!r}:\n" + "".join(self.lines[-40:]))

    def finish(self):
        self.lines.extend(self.proc.stdout)
        rc = self.proc.wait()
        self.watchdog.cancel()
        return rc, "".join(self.lines)


def worker_pids(launcher_pid):
    """{rank: pid} of torchrun's workers (its children with a RANK in their environment)."""
    workers = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            workers[int(env[b"RANK"])] = int(entry)
    return workers


def stopped_at(output):
    """(step, resume command argv) from the 'stopped at step N ...; resume with: CMD' line."""
    match = re.search(r"^stopped at step (\d+) on .*; resume with: (.+)$", output, re.M)
    assert match, output[-3000:]
    return int(match.group(1)), shlex.split(match.group(2))


def test_sigterm_saves_and_the_printed_command_resumes_one_rank(tmp_path, tokenizer_dir, corpus_dir):
    """--save-every 0 (no checkpoint otherwise): SIGTERM -> exit 0, a checkpoint, a resume command that resumes;
    then the newest checkpoint corrupted (same size) is refused in one line naming the earlier step."""
    run_dir = tmp_path / "r"
    args = TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "100000",
                   "--save-every", "0", "--run-dir", str(run_dir)]
    run = Run([sys.executable, "-m", "scripts.base_train", *args], tmp_path, 1)
    run.wait_for(r"^step 00001/")
    run.proc.send_signal(signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 0, out[-3000:]
    step, command = stopped_at(out)
    assert list_steps(str(run_dir / "checkpoints")) == [step] and "saved checkpoint" in out
    assert command[:3] == ["python", "-m", "scripts.base_train"] and command[-2:] == ["--resume-from-step", str(step)]

    resumed = Run([sys.executable, *command[1:]], tmp_path, 1)
    resumed.wait_for(rf"^resumed from .*step_{step:06d} at step {step}$")
    resumed.wait_for(rf"^step {step + 1:05d}/")
    resumed.proc.send_signal(signal.SIGINT)
    rc, out = resumed.finish()
    later, _ = stopped_at(out)
    assert rc == 0 and later > step and list_steps(str(run_dir / "checkpoints")) == [step, later]

    overwrite_middle(os.path.join(step_dir(str(run_dir / "checkpoints"), later), "rank_000.pt"))
    out = subprocess.run([sys.executable, *command[1:-1], "latest"], cwd=REPO, env=env_for(tmp_path, 1),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    error = out.stderr.strip()
    assert len(error.splitlines()) == 1 and f"step_{later:06d}/rank_000.pt is corrupt" in error, out.stderr
    assert error.endswith(f"--resume-from-step {step}")


def test_sigterm_to_one_rank_stops_both_and_resumes_two_ranks(tmp_path, tokenizer_dir, corpus_dir):
    """torchrun, 2 ranks (gloo): SIGTERM to rank 1 only -> both ranks agree (all-reduce), save, exit 0. The printed
    torchrun command resumes; Ctrl-C to the whole process group (every worker gets SIGINT twice: from the
    'terminal' and forwarded by torchrun) stops it again with a checkpoint instead of killing it."""
    run_dir = tmp_path / "r"
    args = TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "100000",
                   "--total-batch-size", "512", "--run-dir", str(run_dir)]
    run = Run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", "--", *args], tmp_path, 2)
    run.wait_for(r"^step 00001/")
    os.kill(worker_pids(run.proc.pid)[1], signal.SIGTERM)
    rc, out = run.finish()
    assert rc == 0, out[-3000:]
    step, command = stopped_at(out)
    assert "on a signal to another rank" in out  # rank 0 was never signalled, and stopped anyway
    assert list_steps(str(run_dir / "checkpoints")) == [step]
    assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node=2", "-m"]

    resumed = Run([*TORCHRUN, *command[1:]], tmp_path, 2)
    resumed.wait_for(rf"^resumed from .*step_{step:06d} at step {step}$")
    resumed.wait_for(rf"^step {step + 1:05d}/")
    os.killpg(resumed.proc.pid, signal.SIGINT)
    _, out = resumed.finish()  # torchrun itself exits 1 after a signal (its own SignalException), workers exit 0
    later, _ = stopped_at(out)
    assert later > step and list_steps(str(run_dir / "checkpoints")) == [step, later]
    assert "exiting now" not in out and "exitcode" not in out  # no worker killed by the duplicate, none failed


# base_train under a byte quota on its run dir: shutil.disk_usage reports quota minus what the run dir
# holds, so the free-space check sees a disk that fills as checkpoints land (no namespaces needed)
QUOTA_RUNNER = """
import os, runpy, shutil, sys
quota, root = int(sys.argv[1]), sys.argv[2]
def disk_usage(path):
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    return shutil._ntuple_diskusage(quota, used, max(0, quota - used))
shutil.disk_usage = disk_usage
sys.argv = ["scripts.base_train", *sys.argv[3:]]
try:
    runpy.run_module("scripts.base_train", run_name="__main__")
finally:
    print("left: " + " ".join(sorted(os.listdir(os.path.join(root, "checkpoints")))), file=sys.stderr)
"""


def mount_namespace(path):
    """The unshare prefix that may mount a small tmpfs at `path` here: an unprivileged user+mount namespace, else a
    mount namespace as root (private either way: nothing stays mounted); None if neither works."""
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        probe = [*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {path}"]
        if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.mark.parametrize("disk", ["tmpfs", "quota"])
def test_full_filesystem_fails_in_one_line_with_bytes_and_resume_command(disk, tmp_path, tokenizer, tokenizer_dir,
                                                                        corpus_dir):
    """Two checkpoints fit, the third does not. tmpfs: a real small filesystem mounted in a user+mount
    namespace (as root where user namespaces are not allowed); quota: the same run with the free space faked
    from the run dir's size, which needs no privileges."""
    prefix = mount_namespace(tmp_path) if disk == "tmpfs" else None
    assert disk == "quota" or prefix, "mounting a tmpfs needs unshare with user namespaces, or root: neither works here"
    import torch
    from nanochat.checkpoint import checkpoint_bytes
    from scripts import base_train
    args = TINY + ["--tokenizer-dir", tokenizer_dir, "--data-dir", corpus_dir, "--num-iterations", "6", "--save-every", "1"]
    parsed = base_train.parse_args(args)
    model = base_train.build_model(parsed, tokenizer.vocab_size, torch.device("cpu"))
    optimizer = base_train.build_optimizer(model, base_train.resolve_hyperparameters(parsed, model, 1), parsed)
    need = checkpoint_bytes(model, {"optimizer": optimizer.state_dict()})
    run_dir = tmp_path / "small"
    run_dir.mkdir()
    size = str(int(2.6 * need))
    if disk == "tmpfs":
        script = ('mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && "$@"; rc=$?; '
                  'echo "left: $(ls -A "$0/checkpoints" | tr "\\n" " ")" >&2; exit $rc')
        command = [*prefix, "sh", "-c", script, str(run_dir), size,
                   str(run_dir), sys.executable, "-m", "scripts.base_train"]
    else:
        command = [sys.executable, "-c", QUOTA_RUNNER, size, str(run_dir)]
    out = subprocess.run([*command, *args, "--run-dir", str(run_dir)], cwd=REPO, env=env_for(tmp_path, 1),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert "saved checkpoint" in out.stdout and "WARNING: a checkpoint needs" in out.stdout  # warned after step 2
    error, left = out.stderr.strip().splitlines()
    match = re.fullmatch(rf"base_train: checkpoint step 3 not saved: no space left on device at {re.escape(str(run_dir))}"
                         r"/checkpoints \(needs ([\d,]+) bytes, ([\d,]+) free\); nothing was written; last good checkpoint: "
                         rf"step 2 — then resume with: python -m scripts\.base_train .* --run-dir {re.escape(str(run_dir))} "
                         r"--resume-from-step 2", error)
    assert match, error
    needed, free = (int(g.replace(",", "")) for g in match.groups())
    assert free < needed and abs(needed - need) < 0.01 * need  # the run's own figure: weights + optimizer (+ loader, RNG)
    assert left.split() == ["left:", "step_000001", "step_000002"]  # no partial directory
