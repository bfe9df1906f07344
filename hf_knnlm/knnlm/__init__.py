"""The kNN-LM method (Khandelwal et al., 2020) and what builds on it.

The mixture (``mixture.py``), the processor for ``generate`` (``logits_process.py``), the
``PreTrainedModel`` wrapper and its config (``modeling_knnlm.py``, ``configuration_knnlm.py``),
sliding-window perplexity (``evaluation.py``) and cached λ × T × k sweeps (``tuning.py``), the ways
to search at fewer steps (``policies.py``: RetoMaton in ``retomaton.py``, adaptive retrieval in
``gate.py``) and attribution (``attribution.py``).
"""

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".attribution": ["explain_generation", "render_html"],
    ".configuration_knnlm": ["KNNLMConfig"],
    ".evaluation": ["evaluate_perplexity"],
    ".gate": ["RetrievalGate", "train_gate"],
    ".logits_process": ["KNNProcessor"],
    ".mixture": ["KNNSettings", "interpolate", "knn_log_probs"],
    ".modeling_knnlm": ["KNNLMForCausalLM"],
    ".retomaton": ["RetoMaton"],
    ".tuning": ["tune"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .attribution import explain_generation, render_html
    from .configuration_knnlm import KNNLMConfig
    from .evaluation import evaluate_perplexity
    from .gate import RetrievalGate, train_gate
    from .logits_process import KNNProcessor
    from .mixture import KNNSettings, interpolate, knn_log_probs
    from .modeling_knnlm import KNNLMForCausalLM
    from .retomaton import RetoMaton
    from .tuning import tune
