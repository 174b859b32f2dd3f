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

__all__ = ["evaluate_perplexity", "perplexity_from_ids"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def perplexity_from_ids(model: torch.nn.Module, stream: torch.Tensor, seq_len: int = 512, batch_size: int = 1,
                        max_windows: Optional[int] = None, progress: bool = True) -> float:
    """Perplexity of `model` on a 1-D token stream cut into non-overlapping `seq_len` windows.

    The tail shorter than a window is dropped; every token but the first of each window is predicted, and the
    loss is averaged over all predicted tokens in float32.
    """
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
        for start in tqdm(range(0, num_windows, batch_size), desc="Perplexity", unit="batch", disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            shift_logits = logits[:, :-1].float()
            nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), batch[:, 1:].reshape(-1).to(logits.device),
                                  reduction="sum")
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
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
        seq_len: window length (512 in our benchmarks; 2048 in the SparseGPT paper).
        batch_size: windows per forward pass.
        max_windows: evaluate at most this many windows.
    """
    if isinstance(source, torch.Tensor) and source.dim() == 1:
        stream = source.long()
    else:
        stream = tokenize_texts(load_texts(source, "evaluation"), tokenizer)
    return perplexity_from_ids(model, stream, seq_len, batch_size, max_windows, progress)
