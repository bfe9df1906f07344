"""Multi-process datastore builds with accelerate: one contiguous range of windows per process.

Under ``accelerate launch --num_processes N hf-knnlm build ...`` (or any script that calls
[`hf_knnlm.Datastore.build`][hf_knnlm.Datastore.build] under accelerate), every process runs the model over
its own contiguous range of windows and writes its own resumable chunks to ``.partial/rank-NNNNN/``; after a
barrier the main process reads every rank's chunks in window order, writes the final shards,
trains and fills the index. Because ranges are contiguous and merged in rank order, the store lists
its entries in the same order as a single-process build. The output folder must be on a
filesystem every process sees (one node, or a shared filesystem across nodes).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import PartialState


def build_state() -> PartialState:
    """The accelerate process state (a single process outside ``accelerate launch``/``torchrun``).

    Without CUDA the processes talk over gloo on CPU: accelerate only picks its multi-CPU mode when
    asked to run on CPU, and its own ``--cpu`` launch needs MPI, so the CPU choice is made here. On
    a CPU-only machine ``accelerate launch --multi_gpu --num_processes N`` (or ``torchrun``) works.
    """
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu or not torch.cuda.is_available())


def window_range(num_windows: int, rank: int, num_processes: int) -> tuple[int, int]:
    """``[first, last)`` windows of process ``rank``: the split of ``PartialState.split_between_processes``.

    The first ``num_windows % num_processes`` processes take one window more.
    """
    if not 0 <= rank < num_processes:
        raise ValueError(f"rank={rank} must be in [0, num_processes={num_processes}).")
    per_process, extra = divmod(num_windows, num_processes)
    first = rank * per_process + min(rank, extra)
    return first, first + per_process + (1 if rank < extra else 0)


def rank_folder(partial: Path, rank: int) -> Path:
    return partial / f"rank-{rank:05d}"


def rank_fingerprint(fingerprint: str, rank: int, num_processes: int, num_windows: int) -> str:
    """A rank's chunks are only resumed by the same rank of a build with the same split."""
    first, last = window_range(num_windows, rank, num_processes)
    return f"{fingerprint}:rank={rank}/{num_processes}:windows={first}-{last}"


def place_model(model: torch.nn.Module, state: PartialState) -> torch.nn.Module:
    """Move the model to this process's accelerator (``cuda:<local rank>``) in a multi-process run.

    A single process, or a CPU run, leaves the model where the caller put it.
    """
    if state.num_processes > 1 and state.device.type != "cpu":
        current = next(model.parameters()).device
        if current != state.device:
            model.to(state.device)
    return model
