"""The fixed glibc mmap threshold: freed batch-sized buffers leave the resident set (they stayed there with
glibc's own adjustment); the user's and the environment's choices win."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_knnlm.utils import allocator

REPO = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

# Batch buffers of slightly different sizes, allocated and freed in turn as a scoring loop does.
_PROBE = """
import json, sys
import numpy as np
from hf_knnlm.utils.allocator import fix_mmap_threshold
fixed = fix_mmap_threshold() if sys.argv[1] == "fixed" else False
def anon():
    with open("/proc/self/status") as status:
        return int(status.read().split("RssAnon:")[1].split()[0]) * 1024
start = anon()
for size in (20, 24, 20, 22):
    block = np.ones(size << 20, dtype=np.uint8)
    del block
print(json.dumps({"fixed": fixed, "kept": anon() - start}))
"""


def _probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "HF_KNNLM_MMAP"))}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PROBE), mode],
        cwd=REPO,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc
def test_freed_batch_buffers_leave_the_resident_set_with_the_fixed_threshold():
    assert _probe("default")["kept"] >= 16 << 20  # glibc's adjustment keeps a freed 20 MB block resident
    fixed = _probe("fixed")
    assert fixed["fixed"] and fixed["kept"] < 4 << 20


@glibc
def test_the_users_choices_win():
    assert _probe("fixed", MALLOC_MMAP_THRESHOLD_="131072")["fixed"] is False
    assert _probe("fixed", HF_KNNLM_MMAP_THRESHOLD="0")["fixed"] is False


def test_a_threshold_that_is_not_a_number_is_refused_by_name(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv(allocator.ENV_VAR, "1MB")
    with pytest.raises(ValueError, match=r"HF_KNNLM_MMAP_THRESHOLD='1MB'.*1048576"):
        allocator.fix_mmap_threshold()
