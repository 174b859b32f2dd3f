"""`wiki_offline_mc`: a 4-way multiple-choice task built from the held-out split of the bundled Wikipedia text.

Each item takes one held-out article (`wiki_offline_texts("evaluation")`, never calibration text): the context is its
first sentence, the true answer its second sentence, and the three distractors are second sentences of other held-out
articles, drawn among those closest in length to the answer (so that neither the raw nor the length-normalised
log-likelihood can win on length alone). Answer positions are shuffled with a fixed seed. Chance level is 25%.

Sentences are split on `.`, `!` or `?` followed by whitespace and an upper-case letter, a digit or a quote; articles
whose first two sentences are not 20-400 characters long are skipped. Everything is a pure function of the bundled
text and `seed`, so two builds give the same items.
"""

from __future__ import annotations

import os
import random
import re
from typing import Optional

from ..data.wiki import wiki_offline_texts

__all__ = [
    "WIKI_MC_TASK", "WIKI_MC_CHANCE", "WIKI_MC_ITEMS", "build_wiki_mc_items", "split_sentences", "wiki_mc_dataset",
    "TASKS_DIR",
]

WIKI_MC_TASK = "wiki_offline_mc"
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")  # lm-eval include_path
WIKI_MC_ITEMS = 400
WIKI_MC_CHOICES = 4
WIKI_MC_CHANCE = 1 / WIKI_MC_CHOICES
_NEAREST = 12  # distractors are drawn among this many other answers closest in length
_MIN_CHARS, _MAX_CHARS = 20, 400
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """Splits an article into sentences (the rule in the module docstring)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def build_wiki_mc_items(num_items: Optional[int] = WIKI_MC_ITEMS, seed: int = 0,
                        texts: Optional[tuple[str, ...]] = None) -> list[dict]:
    """The items of `wiki_offline_mc`: dicts with `context`, `choices` (4 sentences), `label` (index of the true one)
    and `article` (index of the source article in the held-out split).

    Args:
        num_items: keep the first `num_items` items (in article order; `None`: all, about 880).
        seed: seed of the distractor draw and the answer positions.
        texts: the articles (default: the held-out split of the bundled Wikipedia text).
    """
    texts = wiki_offline_texts("evaluation") if texts is None else texts
    pairs = []  # (article index, first sentence, second sentence)
    for index, text in enumerate(texts):
        sentences = split_sentences(text)
        if len(sentences) >= 2 and all(_MIN_CHARS <= len(s) <= _MAX_CHARS for s in sentences[:2]):
            pairs.append((index, sentences[0], sentences[1]))
    if len(pairs) < WIKI_MC_CHOICES:
        raise ValueError(f"Only {len(pairs)} usable articles; {WIKI_MC_CHOICES} are needed for one item.")
    by_length = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][2]), i))
    rank = {pair: r for r, pair in enumerate(by_length)}
    rng = random.Random(seed)
    items = []
    for i, (article, context, answer) in enumerate(pairs):
        if num_items is not None and len(items) >= num_items:
            break
        r = rank[i]
        window = [j for j in by_length[max(0, r - _NEAREST): r + _NEAREST + 1]
                  if j != i and pairs[j][2] != answer]
        window.sort(key=lambda j: (abs(len(pairs[j][2]) - len(answer)), j))
        distractors = [pairs[j][2] for j in rng.sample(window[:_NEAREST], WIKI_MC_CHOICES - 1)]
        label = rng.randrange(WIKI_MC_CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"context": context, "choices": choices, "label": label, "article": article})
    return items


def wiki_mc_dataset(seed: int = 0):
    """The task as a `datasets.DatasetDict`: `test` holds the first `WIKI_MC_ITEMS` items, `train` the rest (the
    few-shot examples, from other articles)."""
    import datasets

    items = build_wiki_mc_items(None, seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items[:WIKI_MC_ITEMS]),
                                 "train": datasets.Dataset.from_list(items[WIKI_MC_ITEMS:])})
