"""REALM pre-training: a retrieval-augmented masked LM over a live MIPS document index.

[`RealmForMaskedLM`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM] (model type ``realm_masked_lm``) is
trained on masked sentences of the corpus (salient spans by default) with the marginal likelihood over the
retrieved documents and the null document, while
[`AsyncIndexRefresh`][hf_knnlm.open_qa.pretraining.AsyncIndexRefresh] re-embeds the corpus in the background;
[`save_for_open_qa`][hf_knnlm.open_qa.pretraining.save_for_open_qa] hands the result to
[`RealmForOpenQA`][hf_knnlm.open_qa.RealmForOpenQA] fine-tuning. Names here are imported on first use.
"""

from typing import TYPE_CHECKING

from ...utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".collator": ["RealmPretrainingCollator"],
    ".configuration": ["RealmMaskedLMConfig"],
    ".export": ["open_qa_from_pretraining", "save_for_open_qa"],
    ".head_warmup": ["head_warm_start"],
    ".ict": ["ict_warm_start"],
    ".masking": ["masked_examples"],
    ".modeling": ["RealmForMaskedLM", "RealmMaskedLMOutput"],
    ".spans": ["salient_spans"],
    ".training": ["pretrain_realm"],
    ".refresh": ["AsyncIndexRefresh"],
    ".settings": ["RealmPretrainingSettings"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .collator import RealmPretrainingCollator
    from .configuration import RealmMaskedLMConfig
    from .export import open_qa_from_pretraining, save_for_open_qa
    from .head_warmup import head_warm_start
    from .ict import ict_warm_start
    from .masking import masked_examples
    from .modeling import RealmForMaskedLM, RealmMaskedLMOutput
    from .refresh import AsyncIndexRefresh
    from .settings import RealmPretrainingSettings
    from .spans import salient_spans
    from .training import pretrain_realm
