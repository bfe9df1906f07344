"""Asynchronous index refresh (REALM's MIPS refresh) as a ``TrainerCallback``.

REALM pre-training re-embeds the corpus with the latest document encoder every few hundred steps in a
separate job while training continues on the stale index. Fine-tuning freezes the document encoder, so the
index never goes stale and the paper does not refresh: this callback is off unless ``every_n_steps > 0``. It
matters when the document side does train, e.g. ``RealmConfig(share_retriever_encoders=True)``.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

from transformers import TrainerCallback

from ..retrieval.document_index import DocumentIndex, embed_corpus

logger = logging.getLogger(__name__)


class IndexRefreshCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, re-embed all documents in a background thread and swap the
    new vectors into ``index`` when done; training keeps using the old index meanwhile.

    A snapshot (deep copy) of the document embedder is taken at the trigger step, so the refresh sees one
    consistent set of weights. If the previous refresh is still running, the trigger is skipped.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from hf_knnlm.open_qa import IndexRefreshCallback
    >>> callback = IndexRefreshCallback(index, tokenizer, every_n_steps=1)  # refresh_index_every=1
    >>> before = index.embeddings.clone()
    >>> with torch.no_grad():  # the document encoder moved (share_retriever_encoders=True trains it)
    ...     _ = model.document_embedder.encoder.embeddings.word_embeddings.weight.mul_(2.0)
    >>> step = SimpleNamespace(global_step=1)  # what Trainer passes after an optimizer step
    >>> _ = callback.on_step_end(None, step, None, model=model)  # re-embeds in a thread
    >>> callback.wait()
    >>> callback.refreshes, torch.equal(before, index.embeddings)  # new vectors swapped in
    (1, False)
    ```
    """

    def __init__(
        self,
        index: DocumentIndex,
        tokenizer: Any,
        every_n_steps: int = 0,
        *,
        batch_size: int = 64,
        max_length: int | None = None,
        wait_at_end: bool = True,
    ):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 = never refresh), got {every_n_steps}.")
        self.index, self.tokenizer = index, tokenizer
        self.every_n_steps = every_n_steps
        self.batch_size, self.max_length = batch_size, max_length
        self.wait_at_end = wait_at_end
        self.refreshes = 0
        self.skipped = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps == 0 or state.global_step % self.every_n_steps != 0 or model is None:
            return control
        self._raise_pending()
        if self._thread is not None and self._thread.is_alive():
            self.skipped += 1
            logger.info("index refresh still running at step %d; skipping this one", state.global_step)
            return control
        snapshot = copy.deepcopy(model.document_embedder).eval()
        max_length = self.max_length or model.config.max_doc_embed_length
        self._thread = threading.Thread(
            target=self._refresh,
            args=(snapshot, max_length),
            daemon=True,
            name=f"realm-index-refresh-{state.global_step}",
        )
        self._thread.start()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.wait_at_end:
            self.wait()
        return control

    def wait(self) -> None:
        """Block until the running refresh (if any) has swapped its vectors in; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
        self._raise_pending()

    def _refresh(self, snapshot, max_length: int) -> None:
        try:
            embeddings = embed_corpus(
                snapshot,
                self.tokenizer,
                self.index.titles,
                self.index.texts,
                batch_size=self.batch_size,
                max_length=max_length,
                show_progress=False,
            )
            self.index.replace_embeddings(embeddings, encoder=snapshot)
            self.refreshes += 1
        except BaseException as error:  # surfaced on the training thread at the next trigger / at the end
            self._error = error

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("background index refresh failed") from error


__all__ = ["IndexRefreshCallback"]
