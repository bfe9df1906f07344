"""hf-knnlm long-evaluate on a tiny saved GPT-2: the four methods, the library's numbers, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_knnlm import MemorizingSettings, MemorizingTransformer, long_context_perplexity
from hf_knnlm.commands import main

WINDOWS = ["--max-length", "64", "--stride", "32", "--max-tokens", "200", "--score-from", "64"]


@pytest.fixture()
def long_document(tmp_path, corpus_text):
    path = tmp_path / "document.txt"
    path.write_text(corpus_text[:4000], encoding="utf-8")
    return path


def long_evaluate(capsys, saved_model, document, *extra) -> dict:
    argv = ["long-evaluate", "--model", str(saved_model), "--data", str(document), *WINDOWS, *extra]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_the_four_methods_and_the_library_agree(saved_model, long_document, tmp_path, capsys):
    run = lambda *extra: long_evaluate(capsys, saved_model, long_document, *extra)  # noqa: E731
    full = run("--method", "full")
    window = run("--method", "window")
    unlimiformer = run("--method", "unlimiformer", "--k", "200", "--output-json", str(tmp_path / "u.json"))
    assert full["scored_tokens"] == window["scored_tokens"] == unlimiformer["scored_tokens"] == 200 - 64
    assert unlimiformer["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)  # k >= the document
    assert window["perplexity"] != pytest.approx(full["perplexity"], rel=1e-3)
    assert json.loads((tmp_path / "u.json").read_text())["perplexity"] == unlimiformer["perplexity"]
    assert unlimiformer["settings"]["k"] == 200 and unlimiformer["method"] == "unlimiformer"

    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    settings = MemorizingSettings(layer=1, k=8, max_length=64, stride=32, gate_init=0.0)
    MemorizingTransformer(model, settings).save_gate(tmp_path / "gate")
    memorizing = run("--method", "memorizing", "--memorizing-layer", "1", "--memorizing-k", "8",
                     "--gate", str(tmp_path / "gate"))  # fmt: skip
    ids = AutoTokenizer.from_pretrained(saved_model)(long_document.read_text())["input_ids"][:200]
    expected = long_context_perplexity(
        model, [torch.tensor(ids)], method="memorizing", settings=settings, score_from=64
    )
    assert memorizing["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert memorizing["settings"] == {**settings.to_dict(), "gate_init": MemorizingSettings.gate_init}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "full", "--max-tokens", "300"], "is longer than the model's 256 positions"),
        (["--k", "0"], "k=0 must be a positive integer"),
        (["--memorizing-layer", "5", "--method", "memorizing"], "layer=5 must be below the model's 2 layers"),
        (["--gate", "g", "--method", "window"], "--gate g is a Memorizing Transformers gate"),
        (["--score-from", "500"], "no document has a token at position 500 or later"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(saved_model, long_document, capsys, extra, message):
    argv = ["long-evaluate", "--model", str(saved_model), "--data", str(long_document), *WINDOWS, *extra]
    assert main(argv) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar, if it loaded
    assert last.startswith("hf-knnlm long-evaluate: error: ") and message in last


def test_a_missing_file_fails_before_the_model_loads(tmp_path, capsys):
    assert main(["long-evaluate", "--model", "no-such-model", "--data", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: no such file" in capsys.readouterr().err


def test_long_generate_continues_a_long_prompt_as_full_attention(saved_model, long_document, capsys):
    tokenizer = AutoTokenizer.from_pretrained(saved_model)
    ids = tokenizer(long_document.read_text(), return_tensors="pt")["input_ids"][:, :150]
    prompt = long_document.parent / "prompt.txt"
    prompt.write_text(tokenizer.decode(ids[0]), encoding="utf-8")
    ids = tokenizer(prompt.read_text(), return_tensors="pt")["input_ids"]  # what the verb tokenizes
    argv = ["long-generate", "--model", str(saved_model), "--prompt-file", str(prompt), "--max-length", "64"]
    assert main([*argv, "--stride", "32", "--k", "200", "--max-new-tokens", "5"]) == 0
    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    full = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(full[0, ids.shape[1] :], skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"
    assert main(["long-generate", "--model", str(saved_model), "--prompt", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_memorizing_train_writes_the_gate_long_evaluate_reads(saved_model, long_document, tmp_path, capsys):
    gate = tmp_path / "gate"
    memorizing = ["--memorizing-layer", "1", "--memorizing-k", "8", "--memorizing-gate-init", "0"]
    argv = [
        "memorizing-train",
        "--model",
        str(saved_model),
        "--data",
        str(long_document),
        "--max-tokens",
        "200",
    ]
    assert main([*argv, "--max-length", "64", "--stride", "32", *memorizing, "--output-dir", str(gate)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["saved_to"] == str(gate / "memorizing_gate.safetensors") and len(trained["gate"]) == 2
    assert trained["gate"] != [0.5, 0.5]  # moved from sigmoid(0)
    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    loaded = MemorizingTransformer(model, MemorizingSettings(layer=1))
    loaded.load_gate(gate)
    assert loaded.gate_values() == trained["gate"]
    evaluated = long_evaluate(capsys, saved_model, long_document, "--method", "memorizing", *memorizing[:4],
                              "--gate", str(gate))  # fmt: skip
    untrained = long_evaluate(capsys, saved_model, long_document, "--method", "memorizing", *memorizing)
    assert evaluated["perplexity"] != untrained["perplexity"]
