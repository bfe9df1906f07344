"""The kNN-LM method (Khandelwal et al., 2020) and what builds on it.

The mixture (``mixture.py``), the processor for ``generate`` (``logits_process.py``), the
``PreTrainedModel`` wrapper and its config (``modeling_knnlm.py``, ``configuration_knnlm.py``),
sliding-window perplexity (``evaluation.py``, over the scored-token stream of ``scored.py``) and
λ × T × k sweeps (``tuning.py``, streamed by ``tuning_stream.py``, grid in ``tuning_grid.py``, picture
in ``tuning_plot.py``),
the ways to search at fewer steps (``policies.py``: RetoMaton in ``retomaton.py``, adaptive retrieval
in ``gate.py`` / ``gate_training.py``) and attribution (``attribution.py``). Every entry point takes
one [`KNNSettings`][hf_knnlm.KNNSettings] (``settings.py``).
"""

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".attribution": ["explain_generation", "render_html"],
    ".configuration_knnlm": ["KNNLMConfig"],
    ".evaluation": ["PerplexityOutput", "evaluate_perplexity"],
    ".gate": ["RetrievalGate"],
    ".gate_settings": ["GateTraining"],
    ".gate_training": ["fit_gate", "train_gate"],
    ".logits_process": ["KNNProcessor"],
    ".mixture": ["interpolate", "knn_log_probs", "knn_target_log_probs", "mix", "mix_targets"],
    ".modeling_knnlm": ["KNNLMForCausalLM"],
    ".policies": ["RetrievalStats", "SearchPolicy", "Step", "search_policy"],
    ".retomaton": ["RetoMaton"],
    ".scored": ["ScoredTokens", "collect_queries"],
    ".settings": ["KNNSettings"],
    ".tuning": ["TuningOutput", "tune"],
    ".tuning_grid": ["TuningGrid"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .attribution import explain_generation, render_html
    from .configuration_knnlm import KNNLMConfig
    from .evaluation import PerplexityOutput, evaluate_perplexity
    from .gate import RetrievalGate
    from .gate_settings import GateTraining
    from .gate_training import fit_gate, train_gate
    from .logits_process import KNNProcessor
    from .mixture import interpolate, knn_log_probs, knn_target_log_probs, mix, mix_targets
    from .modeling_knnlm import KNNLMForCausalLM
    from .policies import RetrievalStats, SearchPolicy, Step, search_policy
    from .retomaton import RetoMaton
    from .scored import ScoredTokens, collect_queries
    from .settings import KNNSettings
    from .tuning import TuningOutput, tune
    from .tuning_grid import TuningGrid
