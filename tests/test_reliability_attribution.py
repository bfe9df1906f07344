"""explain_generation names every argument that cannot be explained: sizes that are not positive integers."""

from __future__ import annotations

import pytest

from hf_knnlm import explain_generation


@pytest.mark.parametrize(
    "kwargs, name",
    [(dict(max_new_tokens=2.5), "max_new_tokens=2.5"), (dict(top=0), "top=0"), (dict(top=True), "top=True")],
    ids=str,
)
def test_explain_generation_refuses_sizes_by_name(model, tokenizer, store, kwargs, name):
    with pytest.raises(ValueError, match=name):
        explain_generation(model, tokenizer, store, "The king", k=4, **{"max_new_tokens": 2, **kwargs})
