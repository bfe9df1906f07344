"""Asynchronous MIPS index refresh for REALM pre-training, with the index's staleness logged.

REALM pre-training trains the document encoder, so the vectors in the index age: every few hundred steps
the paper re-embeds the corpus with a snapshot of the document encoder in a separate job and swaps the new
index in while training goes on (a 30x staler index cost it 10 EM). This callback does that in a thread:
[`IndexRefreshCallback`][hf_knnlm.open_qa.IndexRefreshCallback] snapshots the encoder at the trigger step
and swaps the vectors in atomically when they are complete; no training step waits for it (a trigger
that comes while a refresh still runs is skipped). On top it records the step of the weights that
embedded the current index, and logs ``index_staleness`` (the steps since then) with every Trainer log.
"""

from __future__ import annotations

import logging
import threading

from ..callbacks import IndexRefreshCallback

logger = logging.getLogger(__name__)


class AsyncIndexRefresh(IndexRefreshCallback):
    """[`IndexRefreshCallback`][hf_knnlm.open_qa.IndexRefreshCallback] that knows how stale the index is.

    ``index_step`` is the optimizer step whose document encoder embedded the vectors being searched (the
    step training began at, until the first swap); ``swaps`` lists ``(snapshot step, step when swapped in)``
    for every completed refresh; each Trainer log (``state.log_history``) gets ``index_staleness``, the
    current step minus ``index_step``.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> model, tokenizer, index = tiny_realm_mlm()  # a random 1-layer RealmForMaskedLM, 2 documents
    >>> from types import SimpleNamespace
    >>> from hf_knnlm.open_qa.pretraining import AsyncIndexRefresh
    >>> refresh = AsyncIndexRefresh(index, tokenizer, every_n_steps=2)
    >>> for step in (1, 2):  # what Trainer calls after each optimizer step
    ...     _ = refresh.on_step_end(None, SimpleNamespace(global_step=step), None, model=model)
    >>> refresh.wait()  # only for the example: training never waits
    >>> refresh.index_step, refresh.swaps
    (2, [(2, 2)])
    ```
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index_step = 0
        self.swaps: list[tuple[int, int]] = []
        self._step = 0
        self._started: dict[threading.Thread, int] = {}  # refresh thread -> step of its snapshot
        self._started_lock = threading.Lock()

    def on_train_begin(self, args, state, control, **kwargs):
        self.index_step = self._step = state.global_step
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._step = state.global_step
        with self._started_lock:  # the new thread reads its step only once it is recorded
            running = self._thread
            control = super().on_step_end(args, state, control, model=model, **kwargs)
            if self._thread is not running:  # a refresh started from this step's weights
                self._started[self._thread] = state.global_step
        return control

    def _refresh(self, snapshot, max_length: int) -> None:
        with self._started_lock:
            step = self._started.pop(threading.current_thread(), self._step)
        super()._refresh(snapshot, max_length)
        if self._error is None:
            self.index_step = step
            self.swaps.append((step, self._step))
            logger.info("index refresh: vectors of step %d swapped in at step %d", step, self._step)

    @property
    def staleness(self) -> int:
        """Steps since the weights that embedded the index being searched."""
        return self._step - self.index_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        staleness = state.global_step - self.index_step
        if logs is not None:
            logs["index_staleness"] = staleness
        if state.log_history:
            state.log_history[-1]["index_staleness"] = staleness
        return control


__all__ = ["AsyncIndexRefresh"]
