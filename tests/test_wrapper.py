"""KNNLMForCausalLM behaves like a transformers causal LM: saving, pushing, hooks, logits_to_keep,
num_items_in_batch, gradients and bf16."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_knnlm import KNNLMForCausalLM

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import tiny_gpt2
except ImportError:
    from conftest import tiny_gpt2

PROMPTS = ["The king sees the bridge. A knight", "My lord sees"]


def _inputs(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _hooks(wrapper) -> int:
    return len(wrapper.model.get_submodule(wrapper.datastore.config.hook_module)._forward_pre_hooks)


@pytest.fixture()
def saved_base(model, tmp_path):
    """The tiny model saved to a folder, so a saved wrapper can name it as its base model."""
    model.save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base")


def test_saving_a_loaded_wrapper_elsewhere_keeps_a_valid_datastore(saved_base, store, tmp_path, tokenizer):
    wrapper = KNNLMForCausalLM.from_pretrained(saved_base, datastore=store, k=8, lmbda=0.5)
    wrapper.save_pretrained(tmp_path / "with-store", save_datastore=True)
    wrapper.save_pretrained(tmp_path / "reference-only")  # saving with the store did not re-point the wrapper
    loaded = KNNLMForCausalLM.from_pretrained(tmp_path / "with-store")
    loaded.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["datastore"] == str((tmp_path / "with-store").resolve())
    assert config["datastore_subfolder"] == "datastore"
    inputs = _inputs(tokenizer)
    cwd = os.getcwd()
    os.chdir(tmp_path / "again")  # a reference that only worked from the right folder would fail here
    try:
        results = [KNNLMForCausalLM.from_pretrained(tmp_path / name) for name in ("again", "reference-only")]
    finally:
        os.chdir(cwd)
    with torch.no_grad():
        expected = wrapper(**inputs).logits
        for other in (loaded, *results):
            assert torch.equal(other(**inputs).logits, expected)


def test_a_config_written_before_datastore_subfolder_still_loads(saved_base, store, tmp_path):
    KNNLMForCausalLM.from_pretrained(saved_base, datastore=store, k=8).save_pretrained(
        tmp_path / "w", save_datastore=True
    )
    path = tmp_path / "w" / "config.json"
    config = json.loads(path.read_text())
    config["datastore"] = "datastore"  # the first release wrote the subfolder here, relative
    del config["datastore_subfolder"]
    path.write_text(json.dumps(config))
    assert len(KNNLMForCausalLM.from_pretrained(tmp_path / "w").datastore) == len(store)


def test_push_honours_its_arguments(saved_base, store, hf_api):
    wrapper = KNNLMForCausalLM.from_pretrained(saved_base, datastore=store, k=8)
    wrapper.push_to_hub(
        "org/knnlm",
        save_datastore=True,
        max_shard_size=300 * 64,
        private=True,
        revision="dev",
        commit_message="wrapper and store",
        token="hf_x",
    )
    assert [name for name, _ in hf_api.calls] == [
        "__init__",
        "create_repo",
        "create_branch",
        "upload_folder",  # no file_exists("README.md"): the wrapper folder has no card of its own
    ]
    assert hf_api.calls[0][1] == {"token": "hf_x"} and hf_api.calls[1][1]["private"] is True
    upload = hf_api.calls[-1][1]
    assert upload["revision"] == "dev" and upload["commit_message"] == "wrapper and store"
    files = upload["files"]
    assert json.loads(files["config.json"])["datastore_subfolder"] == "datastore"
    shards = [name for name in files if name.startswith("datastore/keys-")]
    assert len(shards) == -(-len(store) // 300) > 1  # max_shard_size reached the datastore


def test_post_init_runs_and_leaves_the_base_weights_alone(model, store):
    before = {name: t.clone() for name, t in model.state_dict().items()}
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert wrapper.all_tied_weights_keys == {
        f"model.{key}": f"model.{value}" for key, value in model.all_tied_weights_keys.items()
    }


def test_no_hook_is_left_on_the_base_model(model, store, tokenizer):
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.5)
    before, inputs = _hooks(wrapper), _inputs(tokenizer)
    wrapper.train()
    try:
        wrapper(**inputs, labels=inputs["input_ids"]).loss.backward()
        assert _hooks(wrapper) == before
        wrapper.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert _hooks(wrapper) == before
        with pytest.raises(IndexError):
            wrapper(input_ids=torch.tensor([[10_000]]))  # fails inside the base model
        assert _hooks(wrapper) == before
    finally:
        wrapper.eval()
        model.zero_grad(set_to_none=True)


def test_logits_to_keep_searches_only_the_kept_positions(model, store, tokenizer, monkeypatch):
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.5)
    inputs = _inputs(tokenizer)
    searched = []
    search = store.search_ids

    def counting(queries, *args, **kwargs):
        searched.append(len(queries))
        return search(queries, *args, **kwargs)

    with torch.no_grad():
        full = wrapper(**inputs).logits
        monkeypatch.setattr(store, "search_ids", counting)
        last = wrapper(**inputs, logits_to_keep=1).logits
        picked = wrapper(**inputs, logits_to_keep=torch.tensor([2, 5])).logits
    # The LM head runs on fewer rows, so the values agree to float rounding, not bit for bit.
    assert last.shape[1] == 1
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(picked, full[:, [2, 5]], atol=1e-5, rtol=1e-5)
    assert searched[0] == 2  # one query per row, not one per position
    with pytest.raises(ValueError, match="shift_labels"):
        wrapper(**inputs, logits_to_keep=1, labels=inputs["input_ids"])


def test_num_items_in_batch_sums_then_divides(model, store, tokenizer):
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.5)
    inputs = _inputs(tokenizer)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = wrapper(**inputs, labels=labels)
        summed = wrapper(**inputs, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    targets = labels[:, 1:]
    nll = -out.logits[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[targets != -100]
    torch.testing.assert_close(out.loss, nll.mean())
    torch.testing.assert_close(summed, nll.sum() / 7)


def test_backward_at_lambda_zero_gives_the_base_model_gradients(model, store, tokenizer):
    inputs = _inputs(tokenizer)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() for p in params]

    expected = grads(model(**inputs, labels=labels).loss)
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.0)
    got = grads(wrapper(**inputs, labels=labels).loss)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    wrapper.settings.lmbda = 0.5
    mixed = grads(wrapper(**inputs, labels=labels).loss)
    assert all(torch.isfinite(g).all() for g in mixed) and any(g.abs().sum() > 0 for g in mixed)
    model.zero_grad(set_to_none=True)


def test_bf16_base_model(tokenizer, store):
    model = tiny_gpt2(len(tokenizer)).to(torch.bfloat16)
    inputs = _inputs(tokenizer)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        base = torch.log_softmax(model(**inputs).logits.float(), -1)
        plain = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.0)(**inputs).logits
    torch.testing.assert_close(plain[mask], base[mask], atol=1e-5, rtol=0)
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.5)
    out = wrapper(**inputs, labels=inputs["input_ids"].masked_fill(~mask, -100))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits[mask]).all()
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    generated = wrapper.generate(
        **inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)
