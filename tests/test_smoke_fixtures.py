def test_store_fixture_builds(store, tokenizer, corpus_text):
    assert len(store) == len(tokenizer(corpus_text)["input_ids"]) - 1
