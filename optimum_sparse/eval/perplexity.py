"""Perplexity over non-overlapping windows (the SparseGPT/Wanda protocol) on held-out text."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibration import load_texts, tokenize_texts
from ..engine.devices import execution_device
from ..utils import show_progress

__all__ = ["evaluate_perplexity", "perplexity_from_ids", "check_context", "model_context"]

logger = logging.getLogger(__name__)


_LOSS_CHUNK = 1024
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context(model: torch.nn.Module) -> Optional[int]:
    """The longest sequence the model was built for (`max_position_embeddings` or its alias), or `None` if unknown."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(model: torch.nn.Module, seq_len: int) -> None:
    """Raises `ValueError` when `seq_len` is not a positive integer or exceeds the model's context."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    context = model_context(model)
    if context is not None and seq_len > context:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's context of {context} tokens ({type(model).__name__} "
            f"max_position_embeddings); use seq_len <= {context} (512 in our benchmarks, 2048 in the SparseGPT paper)."
        )


@torch.no_grad()
def perplexity_from_ids(model: torch.nn.Module, stream: torch.Tensor, seq_len: int = 512, batch_size: int = 1,
                        max_windows: Optional[int] = None, progress: bool = True) -> float:
    """Perplexity of `model` on a 1-D token stream cut into non-overlapping `seq_len` windows.

    The tail shorter than a window is dropped; every token but the first of each window is predicted, and the
    loss is averaged over all predicted tokens in float32 (computed over at most 1024 positions at a time, so memory
    is bounded by one batch of windows). A `seq_len` above the model's context (`max_position_embeddings`) is
    refused with `ValueError` before any forward pass.
    """
    check_context(model, seq_len)
    num_windows = stream.numel() // seq_len
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    if num_windows == 0:
        raise ValueError(f"The evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}.")
    windows = stream[: num_windows * seq_len].view(num_windows, seq_len)
    device = execution_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in tqdm(range(0, num_windows, batch_size), desc="Perplexity", unit="batch", disable=not show_progress(progress)):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            labels = batch[:, 1:].to(logits.device)
            for row in range(logits.shape[0]):  # float32 copies of at most _LOSS_CHUNK positions at a time
                for t in range(0, seq_len - 1, _LOSS_CHUNK):
                    chunk = logits[row, t : min(t + _LOSS_CHUNK, seq_len - 1)].float()
                    total_nll += float(F.cross_entropy(chunk, labels[row, t : t + chunk.shape[0]], reduction="sum"))
            total_tokens += labels.numel()
            del logits
    finally:
        model.train(was_training)
    if not math.isfinite(total_nll):
        return float("inf")
    return math.exp(total_nll / total_tokens)


def evaluate_perplexity(model: torch.nn.Module, tokenizer: Any, source: Any = "wiki-offline", seq_len: int = 512,
                        batch_size: int = 1, max_windows: Optional[int] = None, progress: bool = True) -> float:
    """Perplexity on the evaluation split of `source` (never the calibration split).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        source: `"wiki-offline"` (held-out articles), `"wikitext2"`/`"c4"`/`"ptb"` (their test/validation split),
            a local `.txt`/`.jsonl` file, a list of strings or a `datasets.Dataset` (used whole: keep it disjoint
            from your calibration text), or a 1-D tensor of token ids.
        seq_len: window length (512 in our benchmarks; 2048 in the SparseGPT paper); at most the model's context
            (`ValueError` otherwise).
        batch_size: windows per forward pass.
        max_windows: evaluate at most this many windows.
    """
    check_context(model, seq_len)  # before tokenizing the evaluation text
    if isinstance(source, torch.Tensor) and source.dim() == 1:
        stream = source.long()
    else:
        stream = tokenize_texts(load_texts(source, "evaluation"), tokenizer)
    return perplexity_from_ids(model, stream, seq_len, batch_size, max_windows, progress)
