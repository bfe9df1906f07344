"""Helpers shared by the reliability tests: a second tokenizer, deeper models, configs without hashes."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import generated_text, tiny_gpt2
except ImportError:
    from conftest import generated_text, tiny_gpt2


def other_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer with the same vocabulary size as the fixture's but other merges."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([generated_text(400, seed=5) + " zebra quux wombat"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )
    assert len(tokenizer) == vocab_size
    return tokenizer


def gpt2_with_layers(vocab_size: int, n_layer: int, seed: int = 0):
    return tiny_gpt2(vocab_size, seed=seed, n_layer=n_layer)


def drop_file_hashes(config_path: Path) -> dict:
    """Empty the ``files`` (sha256 per file) of a saved config; returns the config as it was."""
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "files": {}}))
    return config
