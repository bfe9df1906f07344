"""bench/gpu_check.py runs everywhere: its CUDA rows skip with their reason on a CPU machine, and a dry
run puts both sides of every row on the CPU, where each must agree with itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_row_runs_on_the_cpu(gpu_check, capsys):
    assert gpu_check.main(["--model", "tiny", "--chars", "8000", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "FAIL" not in table
    for name in gpu_check.CUDA_ROWS:
        assert f"| {name} |" in table


def test_without_cuda_the_cuda_rows_say_why(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_reason", lambda: "no CUDA device visible to torch")
    assert gpu_check.main(["--model", "tiny", "--chars", "4000"]) == 0
    table = capsys.readouterr().out
    assert table.count("skipped: no CUDA device visible to torch") == len(gpu_check.CUDA_ROWS)
    assert "| CPU reference: self-neighbour | pass |" in table
