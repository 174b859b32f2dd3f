"""Scoring candidate allocations against the dense model, block by block from cached activations.

The dense teacher's top-k log-probabilities and block outputs are computed once. For the current parent the scorer
keeps every block's output; a child that first differs from its parent in block `b` is run from the parent's cached
input of block `b` only (the blocks before it are replaced by a module returning that input), so the model's own
forward still builds masks, positions and the head (final norm, soft-capping, `lm_head`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["Scorer", "FITNESS"]

FITNESS = ("kl", "hidden", "kl+hidden")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class _Replay(nn.Module):
    """Stands in for a skipped block: returns the cached hidden state, shaped like the block's own output."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple
        for attr in ("attention_type", "layer_type", "is_sliding", "layer_idx"):  # read by some model loops
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


class Scorer:
    """Fitness of the model's current weights: KL to the dense teacher's next-token distribution (over its top-k
    tokens, renormalised) and/or the relative distance of every block output to the teacher's.

    Args:
        model: the dense model (its weights are read by the teacher pass in `__init__`).
        blocks: the model's decoder blocks.
        batches: token id batches of the search set.
        fitness: `"kl"`, `"hidden"` or `"kl+hidden"`.
        topk: teacher tokens kept per position (all when at least the vocabulary size).
        hidden_weight: weight of the hidden-state term in `"kl+hidden"`.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, batches: list, fitness: str = "kl",
                 topk: int = 512, hidden_weight: float = 1.0):
        self.model, self.blocks, self.batches = model, blocks, batches
        self.fitness, self.topk, self.hidden_weight = fitness, topk, hidden_weight
        self.as_tuple = False
        self.embeds: list = []
        self.teacher_top: list = []
        self.teacher_out: list = []
        for ids in batches:
            logits, outs, emb = self._run(ids, 0, None, capture_input=True)
            self.embeds.append(emb)
            self.teacher_out.append(outs)
            logp = torch.log_softmax(logits.float(), dim=-1)
            k = min(topk, logp.shape[-1])
            values, indices = logp.topk(k, dim=-1)
            self.teacher_top.append((values - torch.logsumexp(values, -1, keepdim=True), indices))
        self.parent_out: list = [list(o) for o in self.teacher_out]
        self.parent_terms: list = [None] * len(batches)

    @contextlib.contextmanager
    def _from_block(self, start: int, hidden: Optional[torch.Tensor]) -> Iterator[None]:
        originals = [self.blocks[i] for i in range(start)]
        try:
            for i in range(start):
                self.blocks[i] = _Replay(originals[i], hidden, self.as_tuple)
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, start: int, hidden: Optional[torch.Tensor], capture_input: bool = False):
        outs: list = [None] * len(self.blocks)
        captured = {}
        handles = []
        for i in range(start, len(self.blocks)):
            def hook(module, args, output, i=i):
                self.as_tuple = isinstance(output, (tuple, list))
                outs[i] = _first(output).detach()

            handles.append(self.blocks[i].register_forward_hook(hook))
        if capture_input:
            def pre_hook(module, args, kwargs):
                captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

            handles.append(self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            with self._from_block(start, hidden):
                device = next(p.device for p in self.model.parameters() if p.device.type != "meta")
                logits = self.model(input_ids=ids.to(device), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        return logits, outs, captured.get("hidden")

    def _terms(self, j: int, logits: torch.Tensor, outs: list) -> tuple[float, float, int]:
        """(summed token KL, mean relative block-output distance, tokens) of batch `j`."""
        kl = 0.0
        if self.fitness != "hidden":
            logq_t, idx = self.teacher_top[j]
            student = logits.float().gather(-1, idx.to(logits.device))
            logq_s = student - torch.logsumexp(student, -1, keepdim=True)
            kl = float((logq_t.exp() * (logq_t - logq_s.cpu())).sum())
        hidden = 0.0
        if self.fitness != "kl":
            dists = []
            for out, ref in zip(outs, self.teacher_out[j]):
                ref32 = ref.float()
                dists.append(float((out.float().cpu() - ref32).pow(2).sum() / ref32.pow(2).sum().clamp_min(1e-30)))
            hidden = sum(dists) / len(dists)
        return kl, hidden, int(logits.shape[0] * logits.shape[1])

    def combine(self, terms: list) -> float:
        tokens = sum(t[2] for t in terms)
        kl = sum(t[0] for t in terms) / tokens
        hidden = sum(t[1] * t[2] for t in terms) / tokens
        if self.fitness == "kl":
            return kl
        if self.fitness == "hidden":
            return hidden
        return kl + self.hidden_weight * hidden

    def score(self, start: int, batches: list, record: bool = False) -> float:
        """Fitness of the current weights on `batches` (indices), given that blocks before `start` equal the
        parent's. `record=True` makes the current weights the new parent (its block outputs are cached)."""
        terms = []
        for j in batches:
            hidden = self.embeds[j] if start == 0 else self.parent_out[j][start - 1]
            logits, outs, _ = self._run(self.batches[j], start, hidden)
            full = self.parent_out[j][:start] + outs[start:]
            terms.append(self._terms(j, logits, full))
            if record:
                self.parent_out[j] = full
                self.parent_terms[j] = terms[-1]
        return self.combine(terms)

    def parent_score(self, batches: list) -> float:
        return self.combine([self.parent_terms[j] for j in batches])


def num_stage_batches(total: int, fraction: float) -> int:
    return max(1, min(total, math.ceil(total * fraction)))
