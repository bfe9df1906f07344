"""hf_knnlm: retrieval-augmented language models (kNN-LM, REALM open-QA) for transformers."""

__version__ = "0.1.0"
