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
