"""Fine-tuning the gate of a Memorizing Transformer with ``transformers.Trainer`` on long documents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils.checks import check_positive_finite, check_positive_int
from .memorizing import MemorizingTransformer


def train_memorizing_gate(
    memorizing: MemorizingTransformer,
    documents: Sequence[torch.Tensor],
    output_dir: str | Path,
    *,
    learning_rate: float = 0.2,
    epochs: int = 2,
    seed: int = 42,
) -> dict[str, Any]:
    """Fine-tune the gate (one bias per head; the model stays frozen) with ``transformers.Trainer``:
    one document per step, scored in windows from an empty memory (a document boundary), constant
    learning rate; then save it to ``output_dir/memorizing_gate.safetensors``.

    Args:
        memorizing (`MemorizingTransformer`): The model with its memory layer and gate.
        documents (`Sequence[torch.Tensor]`): Token ids, one 1-D tensor per training document.
        output_dir (`str | Path`): Where the gate (and the Trainer's files) go.
        learning_rate (`float`, *optional*, defaults to 0.2): Adam's step on the gate biases.
        epochs (`int`, *optional*, defaults to 2): Passes over the documents.
        seed (`int`, *optional*, defaults to 42): The Trainer's seed (the order of the documents).

    Returns:
        `dict`: ``gate`` (sigmoid of each head's bias), ``train_loss``, ``seconds`` and ``saved_to``.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from hf_knnlm import MemorizingSettings, MemorizingTransformer, train_memorizing_gate
    >>> _ = torch.manual_seed(0)
    >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(config).eval()
    >>> settings = MemorizingSettings(layer=1, k=8, max_length=32, stride=16, gate_init=0.0)
    >>> memorizing = MemorizingTransformer(model, settings)
    >>> documents = [torch.randint(0, 50, (96,)) for _ in range(2)]
    >>> result = train_memorizing_gate(memorizing, documents, "gate-out", epochs=1)
    >>> result["saved_to"], len(result["gate"])  # one gate per head, saved with safetensors
    ('gate-out/memorizing_gate.safetensors', 4)
    >>> result["gate"] != [0.5] * 4  # trained away from sigmoid(0)
    True
    >>> other = MemorizingTransformer(model, settings)
    >>> other.load_gate("gate-out")
    >>> other.gate_values() == result["gate"]
    True
    ```
    """
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    check_positive_finite("learning_rate", learning_rate, "Adam's step on the gate biases")
    check_positive_int("epochs", epochs, "passes over the documents")
    if not isinstance(memorizing, MemorizingTransformer):
        raise TypeError(f"memorizing must be a MemorizingTransformer, not {type(memorizing).__name__}.")
    if not documents:
        raise ValueError("documents is empty; pass at least one 1-D tensor of token ids.")
    bad = next((i for i, d in enumerate(documents) if not isinstance(d, torch.Tensor) or d.ndim != 1), None)
    if bad is not None:
        raise ValueError(f"documents[{bad}] must be a 1-D tensor of token ids.")
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=1,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=memorizing.gate.device.type == "cpu",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=seed,
    )
    trainer = Trainer(model=memorizing, args=arguments, train_dataset=[{"input_ids": d} for d in documents])
    for callback in (PrinterCallback, ProgressCallback):  # the result is returned, not printed
        trainer.remove_callback(callback)
    with torch.enable_grad():
        metrics = trainer.train().metrics
    path = memorizing.save_gate(output_dir)
    return {
        "gate": memorizing.gate_values(),
        "train_loss": metrics["train_loss"],
        "seconds": metrics["train_runtime"],
        "saved_to": str(path),
    }


__all__ = ["train_memorizing_gate"]
