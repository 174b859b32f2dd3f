"""Calibration and evaluation data: every accepted source turned into token ids.

Sources (`get_calibration_ids` / `load_texts`):
  * pre-tokenized `input_ids`: a `torch.Tensor` `[n, seq_len]` or a list of equal-length lists, used exactly as given;
  * pre-tokenized batches: a `torch.utils.data.DataLoader` (or any iterable) of id tensors or of `{"input_ids": ...}`
    dicts, a list of such dicts or tensors, a tokenizer's `BatchEncoding`. Padding marked by an `attention_mask` is
    dropped; rows of one length are used as given, rows of different lengths are joined and `num_samples` windows of
    `seq_len` tokens drawn from them (like text);
  * `"wiki-offline"`: the bundled Wikipedia text (see `optimum_sparse.data.wiki`);
  * `"wikitext2"`, `"c4"`, `"ptb"`: the usual Hub datasets through `datasets` (needs network or a local cache);
  * a local `.txt` file (the whole file) or `.jsonl` file (its `"text"` field);
  * a `datasets.Dataset` (its `"text"` column) or a list of strings;
  * any other string: a `datasets` dataset name, its `"text"` column.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Sequence

import torch

from ..errors import CalibrationError
from .wiki import wiki_offline_texts

__all__ = ["CalibrationError", "load_texts", "tokenize_texts", "get_calibration_ids", "sample_windows"]

logger = logging.getLogger(__name__)

# (dataset name, config, calibration split, evaluation split, text field)
_HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text"),
    "c4": ("allenai/c4", "en", "train", "validation", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence"),
}


def _read_local(path: str) -> list[str]:
    if path.endswith(".jsonl"):
        texts = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or "text" not in record:
                    raise CalibrationError(f"{path}:{line_no}: each JSONL line needs a 'text' field.")
                texts.append(str(record["text"]))
        return texts
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def _dataset_texts(dataset: Any, field: str = "text") -> list[str]:
    if field not in dataset.column_names:
        raise CalibrationError(f"The dataset has no {field!r} column (columns: {dataset.column_names}).")
    return [t for t in dataset[field] if t]


def load_texts(source: Any, split: str = "calibration") -> list[str]:
    """Loads the raw texts of a source; `split` is `"calibration"` or `"evaluation"` (held-out text)."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}.")
    if isinstance(source, str):
        if source == "wiki-offline":
            return list(wiki_offline_texts(split))
        if os.path.isfile(source):
            return _read_local(source)
        if source.endswith((".txt", ".jsonl")):
            raise CalibrationError(f"Calibration file not found: {source}")
        import datasets

        if source in _HUB_DATASETS:
            name, config, calib_split, eval_split, field = _HUB_DATASETS[source]
            data = datasets.load_dataset(name, config, split=calib_split if split == "calibration" else eval_split)
            return _dataset_texts(data, field)
        data = datasets.load_dataset(source, split="train" if split == "calibration" else "test")
        return _dataset_texts(data)
    try:
        import datasets

        if isinstance(source, datasets.Dataset):
            return _dataset_texts(source)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        return list(source)
    raise CalibrationError(
        f"Unsupported calibration source of type {type(source).__name__}: pass a name ('wiki-offline', "
        "'wikitext2', 'c4', 'ptb'), a .txt/.jsonl path, a datasets.Dataset, a list of strings, or input_ids."
    )


def tokenize_texts(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """Tokenizes texts joined by blank lines into one 1-D stream of ids (no special tokens)."""
    if tokenizer is None:
        raise ValueError("A tokenizer is required to tokenize text calibration data (pass tokenizer=...).")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise CalibrationError("The calibration set is empty.")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Draws `num_samples` random windows of `seq_len` tokens from a 1-D stream, seeded."""
    if stream.numel() <= seq_len:
        raise CalibrationError(
            f"The calibration text has {stream.numel()} tokens, too short for seq_len={seq_len}; "
            "lower seq_len or give more text."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def _as_input_ids(source: Any) -> Optional[torch.Tensor]:
    if isinstance(source, torch.Tensor):
        ids = source
    elif isinstance(source, (list, tuple)) and source and all(isinstance(row, (list, tuple)) for row in source):
        if len({len(row) for row in source}) != 1:
            raise CalibrationError("Pre-tokenized input_ids must all have the same length.")
        ids = torch.tensor(source)
    else:
        return None
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise CalibrationError(f"Pre-tokenized input_ids must be a non-empty [n, seq_len] tensor, got shape {tuple(ids.shape)}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationError(f"Pre-tokenized input_ids must be integers, got {ids.dtype}.")
    return ids.long()


def _row_list(ids: Any, mask: Any = None) -> list[torch.Tensor]:
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationError(f"Pre-tokenized input_ids must be integers, got {ids.dtype}.")
    if ids.dim() not in (1, 2):
        raise CalibrationError(f"Each calibration batch's input_ids must be [seq_len] or [batch, seq_len], got shape "
                               f"{tuple(ids.shape)}.")
    rows = list(ids.reshape(-1, ids.shape[-1]).long()) if ids.numel() else []
    if mask is not None:
        keep = torch.as_tensor(mask).reshape(-1, ids.shape[-1]).bool()
        rows = [row[m] for row, m in zip(rows, keep)]
    return [row for row in rows if row.numel()]


def _is_text_dataset(source: Any) -> bool:
    try:
        import datasets

        return isinstance(source, datasets.Dataset) and "input_ids" not in source.column_names
    except ImportError:  # pragma: no cover
        return False


def _batched_rows(source: Any) -> Optional[list[torch.Tensor]]:
    """Rows of token ids from dict/tensor batches (a DataLoader, a list of dicts, ...), or `None` for other sources."""
    if isinstance(source, (str, bytes, torch.Tensor)) or not hasattr(source, "__iter__") or _is_text_dataset(source):
        return None
    if isinstance(source, (list, tuple)) and all(isinstance(row, (list, tuple, str)) for row in source):
        return None  # texts, or lists of ids (`_as_input_ids`)
    items = [source] if hasattr(source, "keys") else source  # one dict / BatchEncoding, or an iterable of batches
    if hasattr(source, "keys") and "input_ids" not in source.keys():
        return None
    rows: list[torch.Tensor] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            rows += _row_list(item)
        elif hasattr(item, "keys") and "input_ids" in item.keys():
            rows += _row_list(item["input_ids"], item.get("attention_mask") if hasattr(item, "get") else None)
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):  # TensorDataset batches
            rows += _row_list(item[0])
        else:
            raise CalibrationError(f"Calibration batch {i} is a {type(item).__name__}; batches must be id tensors or "
                                   "dicts with an 'input_ids' entry.")
    if not rows:
        raise CalibrationError("The calibration set is empty (no token ids in the given batches).")
    return rows


def get_calibration_ids(source: Any, tokenizer: Any, num_samples: int, seq_len: int, seed: int = 0,
                        vocab_size: Optional[int] = None) -> torch.Tensor:
    """Returns calibration token ids `[num_samples, seq_len]` (pre-tokenized sources: exactly as given)."""
    rows = _batched_rows(source)
    if rows is not None:  # rows of one length as given; else joined and windowed like text
        source = torch.stack(rows) if len({row.numel() for row in rows}) == 1 else sample_windows(
            torch.cat(rows), num_samples, seq_len, seed)
    ids = _as_input_ids(source)
    if ids is None:
        if tokenizer is None:  # before loading (or downloading) any text
            raise ValueError("A tokenizer is required to tokenize text calibration data (pass tokenizer=...).")
        ids = sample_windows(tokenize_texts(load_texts(source, "calibration"), tokenizer), num_samples, seq_len, seed)
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CalibrationError(f"input_ids must lie in [0, {vocab_size}); got values in [{int(ids.min())}, {int(ids.max())}].")
    return ids
