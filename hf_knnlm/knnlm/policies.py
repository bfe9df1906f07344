"""Ways to skip the faiss search at some steps: RetoMaton's pointers or an adaptive-retrieval gate."""

from __future__ import annotations

from .mixture import KNNSettings


def search_skipper(datastore, settings: KNNSettings, retomaton: int | None, gate, *, stream: bool):
    """What replaces the plain search for ``retomaton`` (a threshold) or ``gate``; None for neither.

    ``stream=True`` gives the teacher-forced form used by evaluation (one token stream, in order),
    ``False`` the per-step form used by :class:`~hf_knnlm.KNNProcessor` during generation.
    """
    if retomaton is not None and gate not in (None, False):
        raise ValueError(
            "pass retomaton= or gate=, not both: the two ways of skipping searches do not combine."
        )
    if retomaton is not None:
        from .retomaton import RetoMaton, RetoMatonRetrieval, RetoMatonSteps

        automaton = RetoMaton(datastore, retomaton, settings.k, settings.recompute_dists)
        return RetoMatonRetrieval(automaton) if stream else RetoMatonSteps(automaton)
    if gate not in (None, False):
        from .gate import GateRetrieval, GateSteps, load_gate

        return (GateRetrieval if stream else GateSteps)(load_gate(gate, datastore), datastore, settings)
    return None
