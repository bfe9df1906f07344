"""Reader warm-start: extractive-QA fine-tuning that yields a plain ``AutoModelForQuestionAnswering``.

REALM, ORQA and DPR all start open-QA training from a reader that can already read.
[`train_reader`][hf_knnlm.open_qa.train_reader] is that step, done the way transformers' ``run_qa.py`` does
it: ``question [SEP] context`` windows of ``max_length`` tokens overlapping by ``doc_stride`` tokens
(``return_overflowing_tokens``), the answer located through the offsets mapping (a window that does not
contain the whole answer points at ``[CLS]``), dynamic padding, windows grouped by length, and the stock
``Trainer``. The saved folder is an ordinary question-answering checkpoint: ``pipeline("question-answering",
model=folder)`` loads it unchanged, and
[`RealmForOpenQA.from_retriever_and_reader`][hf_knnlm.open_qa.RealmForOpenQA.from_retriever_and_reader] takes
it as the reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from ..utils.checks import check_positive_finite, check_positive_int, is_int
from ..utils.files import atomic_write_json, folder_lock, save_pretrained_atomically
from .training import training_arguments_for

logger = logging.getLogger(__name__)

_COLUMNS = ("question", "context", "answers")
_RUN_SETTINGS = "hf_knnlm_reader_run.json"


def _answer_chars(context: str, answers: Any) -> tuple[int, int] | None:
    """``(start, end)`` character span of the first answer, from ``answer_start`` or, without it, the first
    occurrence of the answer text in the context; ``None`` when it cannot be placed."""
    if isinstance(answers, Mapping):
        texts, starts = list(answers.get("text") or []), list(answers.get("answer_start") or [])
    else:
        texts, starts = ([answers] if isinstance(answers, str) else list(answers)), []
    for i, text in enumerate(texts):
        start = int(starts[i]) if i < len(starts) else context.find(text)
        if text and start >= 0 and context[start : start + len(text)] == text:
            return start, start + len(text)
    return None


def prepare_reader_features(
    examples: Mapping[str, list], tokenizer: Any, max_length: int = 384, doc_stride: int = 128
) -> dict[str, list]:
    """Batched ``datasets.map`` function: SQuAD-style rows -> windows with ``start_positions`` /
    ``end_positions`` (the ``[CLS]`` index when the window does not hold the answer) and ``length``.

    Examples:

    ```python
    >>> from transformers import BertTokenizerFast
    >>> words = "[PAD] [UNK] [CLS] [SEP] [MASK] where does the cat sit sits on mat".split()
    >>> tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    >>> from hf_knnlm.open_qa import prepare_reader_features
    >>> rows = {"question": ["where does the cat sit"], "context": ["the cat sits on the mat"],
    ...         "answers": [{"text": ["the mat"], "answer_start": [16]}]}
    >>> features = prepare_reader_features(rows, tokenizer, max_length=32, doc_stride=8)
    >>> start, end = features["start_positions"][0], features["end_positions"][0]
    >>> tokenizer.decode(features["input_ids"][0][start : end + 1])  # the labelled answer tokens
    'the mat'
    ```
    """
    pad_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    encoded = tokenizer(
        questions if pad_right else contexts,
        contexts if pad_right else questions,
        truncation="only_second" if pad_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    sample_map = encoded.pop("overflow_to_sample_mapping")
    offsets_all = encoded.pop("offset_mapping")
    context_id = 1 if pad_right else 0
    starts, ends = [], []
    for i, offsets in enumerate(offsets_all):
        input_ids = encoded["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        sequence_ids = encoded.sequence_ids(i)
        span = _answer_chars(contexts[sample_map[i]], examples["answers"][sample_map[i]])
        in_context = [t for t, s in enumerate(sequence_ids) if s == context_id]
        if (
            span is None
            or not in_context
            or not (offsets[in_context[0]][0] <= span[0] and offsets[in_context[-1]][1] >= span[1])
        ):
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        starts.append(next(t for t in in_context if offsets[t][1] > span[0]))
        ends.append(next(t for t in reversed(in_context) if offsets[t][0] < span[1]))
    encoded["start_positions"], encoded["end_positions"] = starts, ends
    encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
    return dict(encoded)


class _EpochCheckpoints(TrainerCallback):
    """Saves the model and tokenizer to ``<output>-epoch-N`` beside ``<output>`` after every epoch
    (safetensors, no optimizer state), so that a long run can be used or evaluated before it ends."""

    def __init__(self, folder: Path, tokenizer: Any):
        self.folder, self.tokenizer = folder, tokenizer

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        target = self.folder.with_name(f"{self.folder.name}-epoch-{round(state.epoch or 0)}")
        _save_checkpoint(model, self.tokenizer, target)
        return control


def _save_checkpoint(model: PreTrainedModel, tokenizer: Any, folder: Path) -> None:
    """Write into a temporary sibling folder, then swap it in: a reader never sees a half-written one."""
    save_pretrained_atomically(folder, model, tokenizer)


def _check_rows(train_dataset: Any) -> None:
    columns = getattr(train_dataset, "column_names", None)
    if columns is None:
        raise ValueError(
            f"train_dataset is a {type(train_dataset).__name__}; pass a datasets.Dataset with columns "
            f"{list(_COLUMNS)} (datasets.Dataset.from_list(rows) makes one)."
        )
    missing = [c for c in _COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"train_dataset has columns {columns}, missing {missing}; rows need question, context and "
            "answers ({'text': [...], 'answer_start': [...]}, or a list of answer strings)."
        )
    if len(train_dataset) == 0:
        raise ValueError("train_dataset is empty; pass at least one (question, context, answers) row.")
    for column in _COLUMNS:
        bad = next((i for i, value in enumerate(train_dataset[column]) if value is None), None)
        if bad is not None:
            raise ValueError(
                f"train_dataset row {bad} has {column} None; drop or fill such rows first, e.g. "
                f"train_dataset.filter(lambda r: r[{column!r}] is not None)."
            )


def _run_settings(model: Any, train_dataset: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """What a rerun must share with a stopped run to continue from its checkpoint: the start model, the rows
    (a sha256 of their content) and every training setting."""
    rows = train_dataset.select_columns(list(_COLUMNS)).to_list()
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    start = model.name_or_path if isinstance(model, PreTrainedModel) else str(model)
    plain = (bool, int, float, str, type(None))
    return {"model": start, "rows_sha256": digest} | {
        key: value if isinstance(value, plain) else repr(value) for key, value in settings.items()
    }


def _checkpoint_to_resume(
    scratch: Path, settings: dict[str, Any], what: str = "reader training"
) -> str | None:
    """The newest complete Trainer checkpoint in ``scratch`` (``trainer_state.json`` is written last),
    when the run that wrote it had the same ``settings``; ``None`` when there is none."""
    done = [c for c in scratch.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    if not done:
        return None
    saved = scratch / _RUN_SETTINGS
    before = json.loads(saved.read_text()) if saved.is_file() else {}
    changed = sorted(key for key in before.keys() | settings.keys() if before.get(key) != settings.get(key))
    if changed:
        diff = "; ".join(f"{key}: {before.get(key)!r} then, {settings.get(key)!r} now" for key in changed)
        raise ValueError(
            f"{scratch} holds a checkpoint of an unfinished {what} with other settings ({diff}); "
            f"rerun with the settings it started with to resume it, or delete {scratch} to start over."
        )
    return str(max(done, key=lambda c: int(c.name.rpartition("-")[2])))


def _check_reader_args(train_dataset: Any, settings: dict[str, Any], save_steps: int | None) -> None:
    """Refuse rows, windows, sizes or a checkpoint interval that cannot train before any model is loaded."""
    _check_rows(train_dataset)
    max_length, doc_stride = settings["max_length"], settings["doc_stride"]
    check_positive_int("max_length", max_length, "tokens per window, e.g. 384")
    check_positive_int("batch_size", settings["batch_size"], "windows per step, e.g. 32")
    check_positive_finite("epochs", settings["epochs"], "training epochs, e.g. 2")
    check_positive_finite("learning_rate", settings["learning_rate"], "e.g. 1e-4")
    if not is_int(settings["max_steps"]) or not (settings["max_steps"] >= 1 or settings["max_steps"] == -1):
        raise ValueError(
            f"max_steps={settings['max_steps']!r} must be a positive integer, or -1 (the epochs decide)."
        )
    if not is_int(doc_stride) or not 0 <= doc_stride < max_length:
        raise ValueError(
            f"doc_stride={doc_stride!r} must be an integer >= 0 and below max_length={max_length} (the "
            "overlap between consecutive windows); 128 with max_length 384 is the usual choice."
        )
    if save_steps is not None:
        check_positive_int("save_steps", save_steps, "steps between checkpoints, or None (none)")


def _reader_and_tokenizer(model: Any, tokenizer: Any, seed: int) -> tuple[PreTrainedModel, Any]:
    """The QA model and a fast tokenizer (windows need its offsets), loaded when given as a path or id."""
    if tokenizer is None:
        if isinstance(model, PreTrainedModel):
            raise ValueError("pass tokenizer= when model is an instance rather than a checkpoint path or id.")
        tokenizer = AutoTokenizer.from_pretrained(model)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; windows need offset mappings. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    if not isinstance(model, PreTrainedModel):
        set_seed(seed)  # a fresh QA head is drawn here: the same seed, the same run
        model = AutoModelForQuestionAnswering.from_pretrained(model)
    return model, tokenizer


def _reader_windows(train_dataset: Any, tokenizer: Any, max_length: int, doc_stride: int) -> Any:
    """The labelled training windows of every row, made once before training (a ``datasets.map``)."""
    return train_dataset.map(
        prepare_reader_features,
        batched=True,
        remove_columns=train_dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "doc_stride": doc_stride},
        desc="reader windows",
    )


def _open_scratch(
    output: Path, run_settings: dict[str, Any], what: str = "reader training"
) -> tuple[Path, str | None]:
    """The Trainer's hidden folder beside ``output`` and the checkpoint to resume from: a stopped run's is
    kept only when its settings match, and the settings are recorded so that a later rerun can check them."""
    scratch = output.with_name(f".{output.name}.trainer")
    resume = _checkpoint_to_resume(scratch, run_settings, what)
    if resume is None:
        shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    atomic_write_json(scratch / _RUN_SETTINGS, run_settings)
    return scratch, resume


def _trainer_arguments(
    scratch: Path, settings: dict[str, Any], logging_steps: float, disable_tqdm: bool, save_steps: int | None
) -> TrainingArguments:
    """The ``TrainingArguments`` of the settings a run records, so that the two cannot drift apart; windows
    are grouped by length and, with ``save_steps``, the newest Trainer checkpoint is kept in ``scratch``."""
    # max_length and doc_stride shape the windows, not the Trainer; warmup_ratio goes in as warmup_steps
    # (below 1 a ratio of the total steps).
    trainer_settings = {
        k: v for k, v in settings.items() if k not in ("max_length", "doc_stride", "warmup_ratio")
    }
    if save_steps is not None:
        trainer_settings |= dict(save_strategy="steps", save_steps=save_steps, save_total_limit=1)
    return training_arguments_for(
        scratch,
        warmup_steps=settings["warmup_ratio"],
        logging_steps=logging_steps,
        disable_tqdm=disable_tqdm,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        **trainer_settings,
    )


def _reader_trainer(
    model: PreTrainedModel, tokenizer: Any, features: Any, args: TrainingArguments, callbacks: list
) -> Trainer:
    """The stock ``Trainer`` over the windows, padding each batch to its longest window."""
    return Trainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )


def _train_and_save(
    trainer: Trainer, tokenizer: Any, output: Path, scratch: Path, resume: str | None
) -> None:
    """Train (from ``resume`` when a stopped run left one), swap the checkpoint into ``output``, then drop
    ``scratch``: only a finished training removes what a rerun would resume from."""
    if resume is not None:
        logger.info("reader training: resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    _save_checkpoint(trainer.model, tokenizer, output)
    shutil.rmtree(scratch, ignore_errors=True)


def train_reader(
    model: str | os.PathLike | PreTrainedModel,
    train_dataset: Any,
    *,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    max_length: int = 384,
    doc_stride: int = 128,
    epochs: float = 2.0,
    max_steps: int = -1,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    warmup_ratio: float | int = 0.1,
    weight_decay: float = 0.01,
    seed: int = 0,
    logging_steps: float = 50,
    save_every_epoch: bool = False,
    save_steps: int | None = None,
    disable_tqdm: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    **training_arguments: Any,
) -> Trainer:
    """Fine-tune ``model`` (a checkpoint path / Hub id or a model; an encoder gets a fresh QA head) for
    extractive QA on rows with ``question``, ``context`` and ``answers`` (the Hub ``squad`` layout) and save a
    standard ``AutoModelForQuestionAnswering`` checkpoint and its tokenizer to ``output_dir``.

    Returns the ``Trainer`` (``state.log_history`` has the losses; ``logging_steps`` below 1 is a ratio of the
    total steps, as in ``TrainingArguments``). With ``save_steps`` the ``Trainer`` keeps a checkpoint
    (model, optimizer, scheduler and RNG states; transformers reads it back with
    ``torch.load(weights_only=True)``) every ``save_steps`` steps in the hidden sibling folder
    ``.<output_dir>.trainer``, the newest only; called again with the same rows and settings, a run that
    was stopped continues from there (other settings are refused while that folder exists), and the
    folder is removed when training completes. A second training into the same ``output_dir`` at the
    same time is refused. ``callbacks`` are added to the ``Trainer`` after the one that writes
    ``<output_dir>-epoch-N`` when ``save_every_epoch``, so an ``on_epoch_end`` callback can evaluate that
    folder. Extra keyword arguments go to ``TrainingArguments`` (e.g. ``bf16=True``, ``use_cpu=True``).

    Example:

    ```python
    >>> import datasets
    >>> from transformers import BertConfig, BertModel, BertTokenizerFast
    >>> from hf_knnlm.open_qa import train_reader
    >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + "where does the cat sit sits on mat".split()
    >>> tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    >>> encoder = BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
    ...                                num_attention_heads=2, intermediate_size=64))
    >>> encoder.save_pretrained("encoder"), tokenizer.save_pretrained("encoder")  # any encoder checkpoint
    (None, ...)
    >>> train = datasets.Dataset.from_list(  # or load_squad("dev-v1.1.json", articles=slice(0, 38))
    ...     [{"question": "where does the cat sit", "context": "the cat sits on the mat",
    ...       "answers": {"text": ["the mat"], "answer_start": [16]}}] * 4)
    >>> trainer = train_reader("encoder", train, output_dir="reader", max_steps=2,
    ...                        batch_size=2, max_length=32, doc_stride=8, disable_tqdm=True)
    {'train_runtime': ..., 'train_loss': ..., 'epoch': ...}
    >>> from transformers import AutoModelForQuestionAnswering
    >>> type(AutoModelForQuestionAnswering.from_pretrained("reader")).__name__  # a standard QA checkpoint
    'BertForQuestionAnswering'
    ```
    """
    settings = dict(
        max_length=max_length,
        doc_stride=doc_stride,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        seed=seed,
        **training_arguments,
    )
    _check_reader_args(train_dataset, settings, save_steps)
    model, tokenizer = _reader_and_tokenizer(model, tokenizer, seed)
    features = _reader_windows(train_dataset, tokenizer, max_length, doc_stride)
    output = Path(output_dir)
    with folder_lock(output, ".train"):
        scratch, resume = _open_scratch(output, _run_settings(model, train_dataset, settings))
        args = _trainer_arguments(scratch, settings, logging_steps, disable_tqdm, save_steps)
        epoch_saver = [_EpochCheckpoints(output, tokenizer)] if save_every_epoch else []
        trainer = _reader_trainer(model, tokenizer, features, args, [*epoch_saver, *(callbacks or [])])
        logger.info("reader training: %d questions -> %d windows", len(train_dataset), len(features))
        _train_and_save(trainer, tokenizer, output, scratch, resume)
    return trainer


__all__ = ["prepare_reader_features", "train_reader"]
