"""Tiny, offline fixtures for the REALM pre-training tests: a 1-layer random BERT masked LM over the six
toy documents of the open-QA tests."""

from __future__ import annotations

import torch

from hf_knnlm.open_qa import DocumentIndex
from hf_knnlm.open_qa.pretraining import RealmForMaskedLM, RealmMaskedLMConfig

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import DOCUMENTS, tiny_bert_config
except ImportError:
    from open_qa_utils import DOCUMENTS, tiny_bert_config


def make_mlm_model(tokenizer, seed: int = 0, **config_kwargs) -> RealmForMaskedLM:
    torch.manual_seed(seed)
    settings = dict(
        retriever_proj_size=16,
        top_k=3,
        max_question_length=24,
        max_reader_length=64,
        max_doc_embed_length=32,
        retriever_score_scale=2.0,
    )
    settings.update(config_kwargs)
    config = RealmMaskedLMConfig(encoder_config=tiny_bert_config(tokenizer).to_dict(), **settings)
    return RealmForMaskedLM(config).eval()


def make_mlm_index(model: RealmForMaskedLM, tokenizer) -> DocumentIndex:
    return DocumentIndex.build(DOCUMENTS, model, tokenizer, batch_size=4, show_progress=False)


def masked_row(tokenizer, text: str, masked_words: list[str], source: int = -1) -> dict:
    """``[CLS] text [SEP]`` with every token of ``masked_words`` replaced by ``[MASK]``."""
    ids = tokenizer(text)["input_ids"]
    targets = set(tokenizer.convert_tokens_to_ids(masked_words))
    labels = [i if i in targets else -100 for i in ids]
    masked = [tokenizer.mask_token_id if i in targets else i for i in ids]
    return {"input_ids": masked, "labels": labels, "source": source}
