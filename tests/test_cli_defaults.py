"""Every CLI default is the library default: the settings a verb builds from a bare command line equal the
settings dataclasses' defaults, and verb-specific options equal the defaults of the function they set."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from hf_knnlm import KNNSettings, RetrievalSettings, WindowSettings
from hf_knnlm.commands import build_parser
from hf_knnlm.commands._common import knn_settings, window_settings
from hf_knnlm.commands._options import dataclass_from_args
from hf_knnlm.commands._rag import replug_documents, retrieval_settings
from hf_knnlm.knnlm.gate_settings import GateTraining
from hf_knnlm.knnlm.tuning_grid import TuningGrid

MODEL = ["--model", "m"]
DATA = ["--data", "d.txt"]
STORE = ["--datastore", "s"]
BARE = {
    "evaluate": [*MODEL, *DATA, *STORE],
    "generate": [*MODEL, *STORE, "--prompt", "p"],
    "explain": [*MODEL, *STORE, "--prompt", "p"],
    "tune": [*MODEL, *DATA, *STORE, "--output-dir", "o"],
    "train-gate": [*MODEL, *DATA, *STORE],
    "build": [*MODEL, *DATA, "--output", "o"],
    "reindex": [*STORE, "--output", "o", "--index-factory", "Flat"],
    "compress": [*STORE, "--output", "o"],
    "rag-evaluate": [*MODEL, *DATA, "--retriever", "r"],
    "rag-generate": [*MODEL, "--retriever", "r", "--prompt", "p"],
    "qa-train": ["--encoder", "e", "--documents", "d", "--train", "t", "--output-dir", "o"],
    "qa-train-reader": ["--model", "m", "--train", "t", "--output-dir", "o"],
    "qa-eval": ["--model", "m", "--index", "i", "--data", "d"],
    "realm-pretrain": ["--retriever", "r", "--documents", "d", "--output-dir", "o"],
    "demo": [],
    "long-evaluate": [*MODEL, *DATA],
    "long-generate": [*MODEL, "--prompt", "p"],
    "memorizing-train": [*MODEL, *DATA, "--output-dir", "o"],
}


def parse(verb: str, *extra: str):
    argv = [verb, *BARE[verb], *extra]
    return build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("verb", ["evaluate", "generate", "explain"])
def test_knn_verbs_default_to_the_library_settings(verb):
    assert knn_settings(parse(verb)) == KNNSettings()
    if verb == "evaluate":
        assert window_settings(parse(verb)) == WindowSettings()


def test_tune_and_train_gate_default_to_the_library():
    tune = parse("tune")
    assert knn_settings(tune) == KNNSettings() and dataclass_from_args(tune, TuningGrid) == TuningGrid()
    gate = parse("train-gate")
    assert knn_settings(gate) == KNNSettings() and dataclass_from_args(gate, GateTraining) == GateTraining()
    assert window_settings(gate) == WindowSettings()


def test_rag_defaults_are_the_library_defaults():
    from hf_knnlm.commands.rag_generate import FLARE_THRESHOLD
    from hf_knnlm.rag import REPLUGProcessor, flare_generate

    assert retrieval_settings(parse("rag-evaluate")) == RetrievalSettings()
    replug = retrieval_settings(parse("rag-evaluate", "--method", "replug"))
    assert replug == RetrievalSettings(num_documents=replug_documents())
    assert replug_documents() == inspect.signature(REPLUGProcessor.__init__).parameters["k"].default
    assert knn_settings(parse("rag-evaluate")) == KNNSettings()
    assert FLARE_THRESHOLD == inspect.signature(flare_generate).parameters["threshold"].default


def test_long_evaluate_defaults_are_the_library_defaults():
    from hf_knnlm import MemorizingSettings, UnlimiformerSettings, long_context_perplexity
    from hf_knnlm.commands.long_evaluate import attention_settings

    assert attention_settings(parse("long-evaluate")) == UnlimiformerSettings()
    assert attention_settings(parse("long-generate")) == UnlimiformerSettings()
    assert attention_settings(parse("long-evaluate", "--method", "memorizing")) == MemorizingSettings()
    assert parse("long-evaluate").method == "unlimiformer"
    got, expected = _signature_defaults(
        long_context_perplexity, parse("long-evaluate"), ["method", "score_from"]
    )
    assert got == expected


def test_memorizing_train_defaults_are_the_library_defaults():
    from hf_knnlm import MemorizingSettings, train_memorizing_gate
    from hf_knnlm.commands.memorizing_train import TRAINING_HELPS, memorizing_settings

    train = parse("memorizing-train")
    assert memorizing_settings(train) == MemorizingSettings()
    got, expected = _signature_defaults(train_memorizing_gate, train, TRAINING_HELPS)
    assert got == expected


def _signature_defaults(function, args, names):
    parameters = inspect.signature(function).parameters
    return {n: getattr(args, n) for n in names}, {n: parameters[n].default for n in names}


def test_realm_defaults_are_the_library_defaults():
    from hf_knnlm.commands.qa import REALM_FIELDS, TRAINING_HELPS
    from hf_knnlm.commands.qa_train_reader import HELPS
    from hf_knnlm.open_qa import RealmConfig, RealmForOpenQA, train_reader, train_realm

    args = parse("qa-train")
    fields = {f.name: f.default for f in dataclasses.fields(RealmConfig)}
    assert {n: getattr(args, n) for n in REALM_FIELDS} == {n: fields[n] for n in REALM_FIELDS}
    got, expected = _signature_defaults(train_realm, args, TRAINING_HELPS)
    assert got == expected
    head = inspect.signature(RealmForOpenQA.from_retriever_and_reader).parameters["reader_head"].default
    assert args.reader_head == head
    got, expected = _signature_defaults(train_reader, parse("qa-train-reader"), HELPS)
    assert got == expected
    assert parse("qa-eval").top_k == RealmConfig.top_k


def test_realm_pretrain_defaults_are_the_library_defaults():
    from hf_knnlm.commands.realm_pretrain import HELPS, MODEL_FIELDS
    from hf_knnlm.open_qa.pretraining import RealmMaskedLMConfig, RealmPretrainingSettings, pretrain_realm

    args = parse("realm-pretrain")
    fields = {f.name: f.default for f in dataclasses.fields(RealmMaskedLMConfig)}
    assert {n: getattr(args, n) for n in MODEL_FIELDS} == {n: fields[n] for n in MODEL_FIELDS}
    assert dataclass_from_args(args, RealmPretrainingSettings) == RealmPretrainingSettings()
    got, expected = _signature_defaults(pretrain_realm, args, HELPS)
    assert got == expected


def test_store_and_index_options_are_the_library_defaults():
    from hf_knnlm import Datastore
    from hf_knnlm.commands.demo import run_demo
    from hf_knnlm.datastore.compress import compress_datastore

    opened = inspect.signature(Datastore.from_pretrained).parameters
    args = parse("evaluate")
    assert (args.nprobe, args.gpu) == (opened["nprobe"].default, opened["gpu"].default)
    built = inspect.signature(Datastore.build).parameters
    build = parse("build")
    for name in ("index_factory", "train_size", "max_shard_size"):
        assert getattr(build, name) == built[name].default, name
    assert window_settings(build).resolve() == WindowSettings().resolve()
    compressed = inspect.signature(compress_datastore).parameters
    compress = parse("compress")
    for name in ("pca_dim", "prune_to", "merge_k", "index_factory", "train_size"):
        assert getattr(compress, name) == compressed[name].default, name
    demo = parse("demo")
    for name, parameter in inspect.signature(run_demo).parameters.items():
        if name != "settings":
            assert getattr(demo, name) == parameter.default, name
    assert dataclass_from_args(demo, KNNSettings, ("k", "lmbda", "temperature")) == KNNSettings()


@pytest.mark.parametrize("verb", sorted(BARE))
def test_every_option_has_a_help_text_with_its_default(verb):
    parser = build_parser([verb])
    sub = next(a for a in parser._actions if a.dest == "command").choices[verb]
    for action in sub._actions:
        if action.dest in ("help", "debug") or action.required or not action.option_strings:
            continue
        assert action.help, f"{verb} {action.option_strings[0]} has no help"
        if action.default is not None and action.default is not False:
            assert "default" in action.help.lower(), f"{verb} {action.option_strings[0]}: {action.help!r}"
