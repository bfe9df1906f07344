"""Shared fixtures: an in-process BPE tokenizer, tiny random causal LMs and a small datastore.

Nothing is downloaded: the tokenizer is trained on generated text and models are random. A test that
needs something from outside (a tool, a package, the shared data folder) asks :func:`require`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

SHARED_DATA = Path(
    os.environ.get("HF_KNNLM_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)
# .ci/run sets it: there every check must run, and a missing tool or file fails rather than skips.
IN_CI = os.environ.get("HF_KNNLM_CI") == "1"


def require(available: bool, reason: str) -> None:
    """Skip the calling test (or module) with ``reason`` unless ``available``; in CI, fail with it.

    ``reason`` names what is missing and how to get it, e.g. ``"no chromium on PATH (apt-get install
    chromium)"``; pytest's ``-ra`` summary lists it for every skipped test.
    """
    if available:
        return
    if IN_CI:
        pytest.fail(f"{reason} (HF_KNNLM_CI=1: in CI this check must run, not skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


_SUBJECTS = [
    "the king",
    "a knight",
    "the old queen",
    "my lord",
    "the fool",
    "a merchant",
    "the river",
    "our town",
]
_VERBS = ["sees", "follows", "remembers", "sells", "crosses", "loves", "fears", "praises"]
_OBJECTS = ["the bridge", "a silver crown", "the northern road", "his brother", "the market", "a quiet song"]
_ENDINGS = [".", "!", ", and night falls.", ", though it rains.", "?"]


def generated_text(num_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences = [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
        f"{rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        for _ in range(num_sentences)
    ]
    return " ".join(sentences)


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return generated_text(400, seed=0)


@pytest.fixture(scope="session")
def other_text() -> str:
    return generated_text(60, seed=1)


@pytest.fixture(scope="session")
def tokenizer(corpus_text: str) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([corpus_text], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )


def tiny_gpt2(vocab_size: int, seed: int = 0, n_embd: int = 32, n_layer: int = 2, n_positions: int = 256):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_gpt2(len(tokenizer))


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory, model, tokenizer) -> Path:
    """The tiny model and its tokenizer saved to a folder, for the CLI."""
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory, model, tokenizer, corpus_text) -> Path:
    from hf_knnlm import Datastore

    folder = tmp_path_factory.mktemp("store")
    Datastore.build(
        model, tokenizer, [corpus_text], folder, max_length=64, stride=32, batch_size=4, disable_progress=True
    )
    return folder


@pytest.fixture()
def store(store_dir):
    from hf_knnlm import Datastore

    return Datastore.from_pretrained(store_dir)


# ------------------------------------------------------------------------------------------ Hub uploads
class RecordingHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records every call; no local server accepts uploads."""

    calls: list[tuple[str, dict]] = []
    remote_files: set[str] = set()

    def __init__(self, token=None, **kwargs):
        self.calls.append(("__init__", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def file_exists(self, repo_id, filename, **kwargs):
        self.calls.append(("file_exists", {"repo_id": repo_id, "filename": filename, **kwargs}))
        return filename in self.remote_files

    def upload_folder(self, *, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return "https://huggingface.co/org/name/commit/0123"


@pytest.fixture()
def hf_api(monkeypatch):
    RecordingHfApi.calls = []
    RecordingHfApi.remote_files = set()
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingHfApi)
    return RecordingHfApi
