"""nanochat.common sets PYTORCH_ALLOC_CONF=expandable_segments:True at import, before anything asks CUDA,
unless the user configured the allocator (under either name)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# records the allocator setting at the moment anything first asks torch about CUDA
PROBE = """
import os, torch
seen = []
real = torch.cuda.is_available
torch.cuda.is_available = lambda: seen.append(os.environ.get("PYTORCH_ALLOC_CONF")) or real()
import nanochat.common
print(seen[0] if seen else "cuda never asked", os.environ.get("PYTORCH_ALLOC_CONF"), sep="|")
"""


def probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**clean, **env, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_expandable_segments_set_before_cuda_is_asked():
    assert probe() == "expandable_segments:True|expandable_segments:True"


def test_a_user_setting_wins():
    assert probe(PYTORCH_ALLOC_CONF="max_split_size_mb:256") == "max_split_size_mb:256|max_split_size_mb:256"
    assert probe(PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:256") == "None|None"  # the pre-2.9 name counts too
