"""A fixed glibc mmap threshold for long scoring runs, so that freed batch buffers go back to the system.

glibc serves an allocation smaller than its mmap threshold from the heap. The threshold starts at 128 KiB
and rises to the size of each mmapped block that is freed, up to 32 MiB, so after the first batches the
buffers of a scoring loop (logits chunks, faiss results, activations: 1 to 100 MB each, a little different
at every batch) come from the heap, where the freed ones fragment it and stay resident: an ``evaluate``
run's resident set grew with the number of tokens scored (docs/benchmarks, "A CLI run"). Setting the
threshold turns that adjustment off, and every block of at least the threshold is mmapped and unmapped when
freed. The ``hf-knnlm`` command sets it for its own process; a Python program can call
[`fix_mmap_threshold`][hf_knnlm.utils.allocator.fix_mmap_threshold] itself, or set glibc's
``MALLOC_MMAP_THRESHOLD_`` before it starts.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: blocks of a batch's size are mmapped; small objects stay on the heap
ENV_VAR = "HF_KNNLM_MMAP_THRESHOLD"  # bytes; 0 leaves glibc's own adjustment on


def _threshold_from_env() -> int | None:
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return DEFAULT_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"{ENV_VAR}={raw!r} is not a number of bytes: set it to e.g. 1048576, or 0 to leave glibc's "
            f"mmap threshold alone."
        ) from None
    return value if value > 0 else None


def fix_mmap_threshold(threshold: int | None = None) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (default: ``$HF_KNNLM_MMAP_THRESHOLD``, else 1 MiB).

    Nothing is changed where the C library is not glibc, where ``MALLOC_MMAP_THRESHOLD_`` is already set
    (the user's choice wins) or with ``HF_KNNLM_MMAP_THRESHOLD=0``.

    Args:
        threshold (`int`, *optional*): the threshold in bytes.

    Returns:
        `bool`: whether the threshold was set.

    Examples:

    ```python
    >>> from hf_knnlm.utils.allocator import fix_mmap_threshold
    >>> isinstance(fix_mmap_threshold(), bool)  # True on glibc (Linux), False elsewhere
    True
    ```
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    threshold = _threshold_from_env() if threshold is None else threshold
    if threshold is None:
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols of the running process, its C library's among them
    except (OSError, TypeError):  # Windows has no such handle
        return False
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: no knob
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


__all__ = ["DEFAULT_THRESHOLD", "ENV_VAR", "fix_mmap_threshold"]
