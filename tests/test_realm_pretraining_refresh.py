"""Asynchronous index refresh during REALM pre-training: training steps go on while a refresh runs, the new
vectors are swapped in when complete, and the index's staleness is logged."""

from __future__ import annotations

import threading

import datasets
import pytest
import torch
from transformers import Trainer, TrainerCallback

from hf_knnlm.open_qa import callbacks as refresh_module
from hf_knnlm.open_qa.pretraining import AsyncIndexRefresh, RealmPretrainingCollator
from hf_knnlm.open_qa.training import training_arguments_for

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import make_tokenizer
    from tests.pretraining_utils import make_mlm_index, make_mlm_model, masked_row
except ImportError:
    from open_qa_utils import make_tokenizer
    from pretraining_utils import make_mlm_index, make_mlm_model, masked_row


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


class HoldUntil(TrainerCallback):
    """At step ``release_at``, notes whether the refresh is still running, then releases it and waits for
    its swap, so that what the log records next is deterministic."""

    def __init__(self, refresh: AsyncIndexRefresh, release: threading.Event, release_at: int):
        self.refresh, self.release, self.release_at = refresh, release, release_at
        self.steps_during_refresh: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        thread = self.refresh._thread
        if thread is not None and thread.is_alive():
            self.steps_during_refresh.append(state.global_step)
        if state.global_step == self.release_at:
            self.release.set()
            thread.join(timeout=60)
        return control


def test_steps_go_on_while_the_refresh_runs_then_it_swaps_in(tokenizer, tmp_path, monkeypatch):
    release = threading.Event()
    real_embed = refresh_module.embed_corpus

    def held_embed(*args, **kwargs):
        assert release.wait(timeout=60), "the refresh was never released"
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(refresh_module, "embed_corpus", held_embed)
    model = make_mlm_model(tokenizer, top_k=2).train()
    index = make_mlm_index(model, tokenizer)
    before = index.embeddings.clone()
    rows = [masked_row(tokenizer, "paris is the capital of france", ["paris"], source=0)] * 10
    refresh = AsyncIndexRefresh(index, tokenizer, every_n_steps=2)
    hold = HoldUntil(refresh, release, release_at=4)
    args = training_arguments_for(
        tmp_path, batch_size=2, epochs=1, max_steps=5, warmup_steps=0, logging_steps=1, seed=0,
        disable_tqdm=True, remove_unused_columns=False, learning_rate=1e-2,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=RealmPretrainingCollator(model, tokenizer, index),
        callbacks=[refresh, hold],
    )
    trainer.train()
    assert hold.steps_during_refresh == [2, 3, 4]  # steps 3 and 4 ran with the refresh of step 2 held
    assert refresh.swaps == [(2, 4)] and refresh.index_step == 2 and refresh.skipped == 1  # step 4's trigger
    staleness = [e["index_staleness"] for e in trainer.state.log_history if "loss" in e]
    assert staleness == [1, 2, 3, 2, 3]  # the swap at step 4 brought the index to step 2's weights
    assert not torch.equal(before, index.embeddings)  # the document encoder trained; its vectors moved
