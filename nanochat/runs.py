"""Run directories: a run's name, where it lives, finding it again, and one writer at a time.

Layout: `<base>/runs/<name>/` holds `run.json`, `log.jsonl`, `checkpoints/step_NNNNNN/` and `LOCK`.
- A run's name is `--run NAME`, else `d<depth>-<YYYYmmdd-HHMMSS>` (its start time): two runs
  started without a name never share a directory, so a baseline and a change at the same depth
  cannot interleave their checkpoints and logs.
- `resolve_run_dir(spec)` finds a run again by name or by path; `latest_run_dir()` finds the
  newest one, which is what evaluation tools default to.
- `RunDirLock` is held by a run (rank 0) for its whole life: a second run on the directory
  stops at once, naming the holder. It is an flock on `LOCK`, which the kernel releases when
  the holder dies however it dies (kill -9 included), so a lock left by a dead run is seen as
  stale without heartbeats or PID guessing, and taken over with a note. Works across nodes on
  filesystems that implement flock remotely (NFSv4 maps it to byte-range locks).
"""

import errno
import fcntl
import itertools
import json
import os
import socket
import time

RUNS_SUBDIR = "runs"
LOCK_NAME = "LOCK"


class RunDirError(Exception):
    """A run directory that cannot be used as asked (busy, unknown, or holding another run): one line says why."""


def timestamp_name(depth, now=None):
    """The default run name: depth plus start time to the second, e.g. d12-20261202-141503."""
    return f"d{depth}-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(now))


def new_run_name(base_dir, depth, now=None):
    """A fresh default name, its directory created now: mkdir is atomic, so a second run started in the
    same second (a sweep, a relaunch) gets `-2`, `-3`, ... instead of the same directory."""
    stem, root = timestamp_name(depth, now), runs_root(base_dir)
    os.makedirs(root, exist_ok=True)
    for i in itertools.count(1):
        name = stem if i == 1 else f"{stem}-{i}"
        try:
            os.mkdir(os.path.join(root, name))
            return name
        except FileExistsError:
            continue


def runs_root(base_dir):
    return os.path.join(base_dir, RUNS_SUBDIR)


def is_run_dir(path):
    return os.path.isfile(os.path.join(path, "run.json"))


def resolve_run_dir(spec, base_dir):
    """A run dir from a path (anything with a separator, or an existing directory) or a run name under <base>/runs."""
    if os.sep in spec or os.path.isdir(spec):
        path = spec
    else:
        path = os.path.join(runs_root(base_dir), spec)
    if not os.path.isdir(path):
        known = ", ".join(list_runs(base_dir)[-5:]) or "none yet"
        raise RunDirError(f"no run {spec!r}: {path} does not exist (latest runs under {runs_root(base_dir)}: {known}); "
                          "pass --run NAME or --run-dir PATH")
    return path


def run_started(path):
    """When the run was created (run.json's 'created'; the directory's mtime for a run without one)."""
    try:
        with open(os.path.join(path, "run.json")) as f:
            return float(json.load(f)["created"])
    except (OSError, ValueError, KeyError, TypeError):
        return os.path.getmtime(path)


def list_runs(base_dir, depth=None):
    """Names of the run dirs under <base>/runs, oldest first; with depth, only runs of that model depth."""
    root = runs_root(base_dir)
    if not os.path.isdir(root):
        return []
    runs = [name for name in os.listdir(root) if is_run_dir(os.path.join(root, name))]
    if depth is not None:
        runs = [name for name in runs if _run_depth(os.path.join(root, name)) == depth]
    return sorted(runs, key=lambda name: run_started(os.path.join(root, name)))


def _run_depth(path):
    try:
        with open(os.path.join(path, "run.json")) as f:
            return json.load(f)["model_config"]["n_layer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_run_dir(base_dir, depth=None):
    """The most recently started run (of that depth), or a RunDirError that says how to name one."""
    runs = list_runs(base_dir, depth)
    if not runs:
        which = f"of depth {depth} " if depth is not None else ""
        raise RunDirError(f"no run {which}under {runs_root(base_dir)}: train one first, or pass --run NAME / --run-dir PATH")
    return os.path.join(runs_root(base_dir), runs[-1])


class RunDirLock:
    """An exclusive lock on a run directory for the life of this process (see the module docstring).

    The LOCK file stays in place: deleting it on release would let a process that opened the old
    file keep a lock on a name no one else sees. Released cleanly, it is left empty; a dead
    holder leaves its line (host, PID, start) in it, which is how a takeover is recognised."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.file = None
        self.took_over = None  # the dead holder's record, when this lock replaced one

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = _read_holder(f)
            f.close()
            raise RunDirError(f"{os.path.dirname(self.path)} is in use by another run ({describe_holder(holder)}): "
                              "wait for it to finish, or give this run another --run name / --run-dir") from None
        self.took_over = _read_holder(f) or None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record) + "\n")
        f.flush()
        self.file = f
        return self

    def release(self):
        if self.file is None:
            return
        self.file.seek(0)
        self.file.truncate()
        self.file.flush()
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()
        self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(f):
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}


def describe_holder(holder):
    if not holder:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {started}"
