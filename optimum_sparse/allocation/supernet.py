"""The search's supernet: every target linear pruned locally at a ladder of pruned counts, stored cheaply on disk.

A variant is stored as its bit-packed mask (`numel / 8` bytes) and, only when the local method also changed the kept
weights (SparseGPT), the kept values in the model's dtype. Variants of the methods that only mask (magnitude, Wanda)
are rebuilt from the dense weight. One safetensors file per block, written atomically; a rerun reuses the files it
finds, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np
import torch

from ..engine.linears import read_weight, write_weight
from ..methods.base import PruningMethod
from ..utils import atomic_write_bytes, atomic_write_text

__all__ = ["Supernet", "SupernetBuilder", "pack_mask", "unpack_mask", "ACCUMULATIONS"]

logger = logging.getLogger(__name__)

ACCUMULATIONS = ("expectation", "centre", "none")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as packed bits (`uint8`, 8 entries per byte)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().flatten().numpy()))


def unpack_mask(packed: torch.Tensor, shape: tuple) -> torch.Tensor:
    numel = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool)).view(*shape)


class Supernet:
    """Variants of every gene (target linear) at levels `-levels..levels` around a centre count, on disk.

    Args:
        folder: where the block files and `meta.json` live.
        names, numel, shapes: the genes (full module names), their weight sizes and `[out, in]` shapes.
        centres: pruned count of each gene at level 0.
        steps: pruned-count step of each gene (equal within a class of equal-size genes: swaps keep the budget).
        levels: variants on each side of the centre.
        kmin, kmax: allowed pruned count range of each gene.
    """

    def __init__(self, folder: str, names: list, numel: list, shapes: list, centres: list, steps: list, levels: int,
                 kmin: list, kmax: list):
        self.folder = folder
        self.names, self.numel, self.shapes = list(names), list(numel), [tuple(s) for s in shapes]
        self.centres, self.steps, self.levels = list(centres), list(steps), int(levels)
        self.kmin, self.kmax = list(kmin), list(kmax)
        self.index = {n: i for i, n in enumerate(self.names)}
        self._block_of: dict[str, int] = {}
        os.makedirs(folder, exist_ok=True)
        meta = {"names": self.names, "centres": self.centres, "steps": self.steps, "levels": self.levels}
        path = os.path.join(folder, "meta.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if json.load(f) != meta:
                    raise ValueError(f"{folder} holds a supernet built with other settings; use another state_dir.")
        else:
            atomic_write_text(path, json.dumps(meta))

    def count(self, gene: int, level: int) -> int:
        return self.centres[gene] + level * self.steps[gene]

    def valid(self, gene: int, level: int) -> bool:
        return abs(level) <= self.levels and self.kmin[gene] <= self.count(gene, level) <= self.kmax[gene]

    def gene_levels(self, gene: int) -> list[int]:
        return [lv for lv in range(-self.levels, self.levels + 1) if self.valid(gene, lv)]

    def block_file(self, block: int) -> str:
        return os.path.join(self.folder, f"block_{block:05d}.safetensors")

    def has_block(self, block: int) -> bool:
        return os.path.isfile(self.block_file(block))

    def save_block(self, block: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        atomic_write_bytes(self.block_file(block), save({k: v.contiguous() for k, v in tensors.items()}))

    def register(self, name: str, block: int) -> None:
        self._block_of[name] = block

    def variant(self, name: str, level: int, dense: torch.Tensor) -> torch.Tensor:
        """The float32 `[out, in]` weight of gene `name` at `level` (`dense`: its dense float32 weight)."""
        from safetensors import safe_open

        gene = self.index[name]
        with safe_open(self.block_file(self._block_of[name]), "pt") as handle:
            mask = unpack_mask(handle.get_tensor(f"{name}|{level}|mask"), self.shapes[gene])
            key = f"{name}|{level}|values"
            if key in handle.keys():
                weight = torch.zeros(self.shapes[gene], dtype=torch.float32)
                weight[~mask] = handle.get_tensor(key).to(torch.float32)
                return weight
        weight = dense.clone()
        weight[mask] = 0.0
        return weight

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.folder, f)) for f in os.listdir(self.folder))


class SupernetBuilder(PruningMethod):
    """Engine pass that prunes every target linear at each ladder level with the chosen local method.

    The next block is calibrated on this block's *expected* output (`accumulation="expectation"`: the forward weight
    is `Σ (1−sₗ) Wₗ / Σ (1−sₗ)`, the weighted expectation of Týr-the-Pruner; `"centre"`: the level-0 variant;
    `"none"`: dense). The released Týr code meant to do this but propagates dense activations (an overwritten
    variable); here it is tested (`tests/allocation/test_search.py`).
    """

    name = "supernet"

    def __init__(self, config, local: PruningMethod, net: Supernet, accumulation: str):
        super().__init__(config)
        self.local, self.net, self.accumulation = local, net, accumulation
        self.stats = local.stats

    def _forward_weight(self, variants: dict[int, torch.Tensor], gene: int, dense: torch.Tensor) -> Optional[torch.Tensor]:
        if self.accumulation == "none":
            return None
        if self.accumulation == "centre":
            return variants[0] if 0 in variants else variants[min(variants, key=abs)]
        weights = {lv: 1.0 - self.net.count(gene, lv) / self.net.numel[gene] for lv in variants}
        total = sum(weights.values())
        return sum(w * variants[lv] for lv, w in weights.items()) / total

    def prune_block(self, job) -> None:
        cached = self.net.has_block(job.index)
        tensors: dict[str, torch.Tensor] = {}
        for name in job.linears:
            self.net.register(job.full_name(name), job.index)
        for group in job.groups():
            stats = ({n: None for n in group} if cached or not self.local.needs_calibration
                     else job.collect_stats(group, want_hessian=self.local.stats == "hessian"))
            for name in group:
                full = job.full_name(name)
                gene = self.net.index[full]
                module = job.linears[name]
                dense = read_weight(module, job.device)
                variants = {}
                for level in self.net.gene_levels(gene):
                    if cached:
                        variants[level] = self.net.variant(full, level, dense.cpu()).to(job.device)
                        continue
                    k = self.net.count(gene, level)
                    new, mask = self.local.prune_weight(dense.clone(), stats[name], k / self.net.numel[gene])
                    tensors[f"{full}|{level}|mask"] = pack_mask(mask)
                    kept = ~mask
                    if not torch.equal(new[kept], dense[kept]):  # the method updated the kept weights
                        tensors[f"{full}|{level}|values"] = new[kept].to(module.weight.dtype).cpu()
                    variants[level] = new.to(module.weight.dtype).to(torch.float32)  # as stored and as written
                forward = self._forward_weight(variants, gene, dense)
                if forward is not None:
                    write_weight(module, forward, full)
                stats[name] = None
        if not cached:
            self.net.save_block(job.index, tensors)
