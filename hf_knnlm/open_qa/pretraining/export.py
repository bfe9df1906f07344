"""From REALM pre-training to open-QA fine-tuning: the checkpoint folder and the model it becomes.

[`save_for_open_qa`][hf_knnlm.open_qa.pretraining.save_for_open_qa] writes one folder (atomically) that holds

* the [`RealmForMaskedLM`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM] checkpoint and its tokenizer
  (``AutoModel.from_pretrained(folder)`` resumes from it);
* ``retriever/``: the query encoder as a plain ``AutoModel`` checkpoint with the tokenizer;
* ``reader/``: the knowledge-augmented encoder without its masked-LM head, the same way;
* ``retriever_embedders.safetensors``: both retriever sides whole (the document encoder, which pre-training
  trains apart from the query encoder, and the projections), and ``open_qa.json``, the retriever settings.

``retriever/`` and ``reader/`` are what
[`RealmForOpenQA.from_retriever_and_reader`][hf_knnlm.open_qa.RealmForOpenQA.from_retriever_and_reader]
takes; [`open_qa_from_pretraining`][hf_knnlm.open_qa.pretraining.open_qa_from_pretraining] calls it and then
loads both embedders whole, so the open-QA retriever is exactly the pre-trained one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ...utils.files import write_folder
from ..modeling import RealmForOpenQA

RETRIEVER, READER = "retriever", "reader"
EMBEDDERS = "retriever_embedders.safetensors"
OPEN_QA_SETTINGS = "open_qa.json"
_RETRIEVER_FIELDS = (
    "retriever_pooling",
    "retriever_proj_size",
    "retriever_normalize",
    "retriever_score_scale",
    "share_retriever_encoders",
    "max_question_length",
    "max_doc_embed_length",
)


def _embedder_tensors(model: Any) -> dict[str, Any]:
    sides = {"query_embedder": model.query_embedder, "doc_embedder": model.document_embedder}
    return {
        f"{side}.{name}": tensor.detach().cpu().contiguous()
        for side, embedder in sides.items()
        for name, tensor in embedder.state_dict().items()
    }


def save_for_open_qa(model: Any, tokenizer: Any, folder: str | os.PathLike) -> Path:
    """Write ``model`` (a pre-trained [`RealmForMaskedLM`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM])
    and ``tokenizer`` into ``folder`` as described above; returns the folder.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> model, tokenizer, _ = tiny_realm_mlm()  # e.g. what pretrain_realm trained
    >>> from hf_knnlm.open_qa import RealmForOpenQA
    >>> from hf_knnlm.open_qa.pretraining import save_for_open_qa
    >>> folder = save_for_open_qa(model, tokenizer, "pretrained")
    >>> sorted(p.name for p in folder.iterdir() if p.is_dir())
    ['reader', 'retriever']
    >>> qa = RealmForOpenQA.from_retriever_and_reader(folder / "retriever", folder / "reader")
    >>> type(qa.reader).__name__  # REALM's span MLP on the pre-trained encoder
    'BertModel'
    ```
    """
    with write_folder(folder) as tmp:  # one writer; the old folder until done
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.query_embedder.encoder.save_pretrained(tmp / RETRIEVER)
        model.encoder.base_model.save_pretrained(tmp / READER)
        for sub in (RETRIEVER, READER):
            tokenizer.save_pretrained(tmp / sub)
        save_file(_embedder_tensors(model), str(tmp / EMBEDDERS), metadata={"format": "hf_knnlm.realm"})
        settings = {name: getattr(model.config, name) for name in _RETRIEVER_FIELDS}
        (tmp / OPEN_QA_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def open_qa_from_pretraining(
    folder: str | os.PathLike, reader: str | os.PathLike | None = None, **config_kwargs: Any
) -> RealmForOpenQA:
    """A [`RealmForOpenQA`][hf_knnlm.open_qa.RealmForOpenQA] whose query and document embedders are those
    of the pre-training checkpoint in ``folder`` (written by
    [`save_for_open_qa`][hf_knnlm.open_qa.pretraining.save_for_open_qa]) and whose reader is ``reader`` (a
    question-answering checkpoint, e.g. from [`train_reader`][hf_knnlm.open_qa.train_reader]; default the
    pre-trained encoder with REALM's span MLP). ``config_kwargs`` are further
    [`RealmConfig`][hf_knnlm.open_qa.RealmConfig] fields (the retriever's come from the checkpoint).

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> model, tokenizer, _ = tiny_realm_mlm(retriever_proj_size=16)  # e.g. what pretrain_realm trained
    >>> from hf_knnlm.open_qa.pretraining import open_qa_from_pretraining, save_for_open_qa
    >>> qa = open_qa_from_pretraining(save_for_open_qa(model, tokenizer, "pretrained"), top_k=2)
    >>> torch.equal(qa.doc_embedder.projection.weight, model.doc_embedder.projection.weight)
    True
    >>> qa.config.retriever_proj_size, qa.config.top_k
    (16, 2)
    ```
    """
    folder = Path(folder)
    missing = [
        name for name in (RETRIEVER, READER, EMBEDDERS, OPEN_QA_SETTINGS) if not (folder / name).exists()
    ]
    if missing:
        raise ValueError(
            f"{folder} lacks {missing}: not a REALM pre-training checkpoint. Write one with "
            "save_for_open_qa() or hf-knnlm realm-pretrain."
        )
    settings = json.loads((folder / OPEN_QA_SETTINGS).read_text(encoding="utf-8")) | config_kwargs
    model = RealmForOpenQA.from_retriever_and_reader(
        folder / RETRIEVER, reader or folder / READER, **settings
    )
    tensors = load_file(str(folder / EMBEDDERS))
    for side, embedder in (("query_embedder", model.query_embedder), ("doc_embedder", model.doc_embedder)):
        if embedder is not None:
            prefix = f"{side}."
            embedder.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
    model.config.name_or_path = str(folder)
    return model


__all__ = ["open_qa_from_pretraining", "save_for_open_qa"]
