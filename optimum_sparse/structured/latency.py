"""Latency budget of the structured search (`allocation_kwargs={"budget": "latency"}`).

The latency of a module (the heads, or the MLP channels, of one block) at `kept` groups is measured on the run's
device by timing what the shrunk module computes on one batch of the calibration shape (`search_batch_size` or
`batch_size` sequences × `seq_len` tokens, the model's dtype, random values): its input projections with the kept rows,
for heads the causal scaled-dot-product attention of the kept query / KV heads, and the output projection with the
kept columns; the median of `latency_repeats` timed runs after one warm-up. Modules of the same shape share
measurements (a cache keyed by kind, shapes and kept count), only counts the search reaches are measured, and the
table is saved in the search's state folder (`latency.json`), so a resumed search reuses the very same values.

A table can be given instead (`allocation_kwargs["latency_table"]`: `{module name: {kept count: seconds}}`, a dict or
a JSON file, e.g. measured on the deployment device): then nothing is timed, every allowed kept count of every module
must be in it, and the search is deterministic (what the tests use).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..allocation.search import STRUCTURED_BUDGETS
from ..engine.devices import solve_device
from ..engine.linears import in_features
from ..utils import atomic_write_text
from .shrink import out_features

__all__ = ["LatencyTable", "load_latency_table", "check_latency_table", "time_module", "BUDGETS"]

logger = logging.getLogger(__name__)

BUDGETS = STRUCTURED_BUDGETS  # the structured search's budget kinds (`StructuredSearchOptions.budget`)


def load_latency_table(value: Union[None, str, dict]) -> Optional[dict]:
    """`{module name: {kept count (int): seconds}}` from a dict or a JSON file; `None` stays `None`.

    Raises:
        ValueError: not a dict / JSON object of dicts, a count that is not an integer, or a time that is not a
            non-negative number.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if not os.path.isfile(value):
            raise ValueError(f"PruningConfig.allocation_kwargs['latency_table']: no JSON file at {value!r}.")
        with open(value, encoding="utf-8") as f:
            value = json.load(f)
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError("PruningConfig.allocation_kwargs['latency_table'] must be {module name: {kept groups: "
                         f"seconds}} (a dict or a JSON file), got {type(value).__name__}.")
    table = {}
    for name, row in value.items():
        table[name] = {}
        for kept, seconds in row.items():
            try:
                count = int(kept)
            except (TypeError, ValueError):
                raise ValueError(f"latency_table[{name!r}]: kept count {kept!r} is not an integer.") from None
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
                raise ValueError(f"latency_table[{name!r}][{kept!r}] must be a time in seconds >= 0, got {seconds!r}.")
            table[name][count] = float(seconds)
    return table


def check_latency_table(table: dict, plan) -> None:
    """Raises `ValueError` when `table` misses a module or one of its allowed kept counts (`ModuleBudget.options()`)."""
    for name, module in zip(plan.module_names(), plan.modules):
        missing = [k for k in module.options() if k not in table.get(name, {})]
        if missing:
            raise ValueError(f"latency_table has no time for {name} at kept groups {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}: give every allowed kept count of every module.")


def _timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_module(plan, module_index: int, kept: int, batch: int, seq_len: int, repeats: int,
                device: Optional[torch.device] = None) -> float:
    """Median seconds of the module `plan.modules[module_index]` shrunk to `kept` groups on a `[batch, seq_len]` batch."""
    module = plan.modules[module_index]
    index, kind = module.key
    block = plan.blocks[index]
    inputs, output = plan.names(kind)
    out_module = block.get_submodule(output)
    device = device or solve_device(block, None)
    dtype = out_module.weight.dtype
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    hidden = in_features(block.get_submodule(inputs[0]))
    x = rand(batch, seq_len, hidden)
    weights = [rand(out_features(block.get_submodule(n)) // module.groups * kept, hidden) for n in inputs]
    w_out = rand(out_features(out_module), in_features(out_module) // module.groups * kept)

    if kind == "channels":
        def run():
            h = [F.linear(x, w) for w in weights]
            a = F.silu(h[0]) * h[1] if len(h) == 2 else F.gelu(h[0])
            return F.linear(a, w_out)
    else:
        geometry = plan.geometry
        q_heads, kv_heads, head_dim = kept * geometry.q_per_kv, kept, geometry.head_dim
        if geometry.shared_kv:  # multi-query: the one key/value head stays
            kv_heads = 1
            weights = [rand((q_heads + 2) * head_dim, hidden)]

        def run():
            h = torch.cat([F.linear(x, w) for w in weights], dim=-1)
            q, k, v = h.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q = q.view(batch, seq_len, q_heads, head_dim).transpose(1, 2)
            k = k.reshape(batch, seq_len, kv_heads, head_dim).transpose(1, 2).repeat_interleave(q_heads // kv_heads, 1)
            v = v.reshape(batch, seq_len, kv_heads, head_dim).transpose(1, 2).repeat_interleave(q_heads // kv_heads, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.linear(a.transpose(1, 2).reshape(batch, seq_len, q_heads * head_dim), w_out)

    return _timed(run, device, repeats)


class LatencyTable:
    """Latency of each module at each kept count: given (`table`), or measured lazily and cached.

    Args:
        plan: the `StructuredPlan`.
        table: a loaded `latency_table` (`{module name: {kept: seconds}}`), or `None` to measure.
        batch, seq_len, repeats: the measured batch shape and timed runs per measurement.
        path: where the measured values are saved (and read back on resume); `None`: not saved.
    """

    def __init__(self, plan, table: Optional[dict], batch: int, seq_len: int, repeats: int,
                 path: Optional[str] = None, device: Optional[torch.device] = None):
        self.plan, self.given = plan, table
        self.batch, self.seq_len, self.repeats, self.path, self.device = batch, seq_len, repeats, path, device
        self.names = plan.module_names()
        self.signatures = [self._signature(g) for g in range(len(plan.modules))]
        self.measured: dict[str, float] = {}
        if table is not None:
            check_latency_table(table, plan)
        elif path is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.measured = json.load(f)

    def _signature(self, gene: int) -> str:
        index, kind = self.plan.modules[gene].key
        block = self.plan.blocks[index]
        inputs, output = self.plan.names(kind)
        shapes = [(out_features(block.get_submodule(n)), in_features(block.get_submodule(n))) for n in (*inputs, output)]
        dtype = str(block.get_submodule(output).weight.dtype)
        return f"{kind}|{self.plan.modules[gene].groups}|{shapes}|{dtype}"

    @property
    def source(self) -> str:
        return "given" if self.given is not None else "measured"

    def __call__(self, gene: int, kept: int) -> float:
        """Seconds of module `gene` at `kept` groups."""
        if self.given is not None:
            return self.given[self.names[gene]][kept]
        key = f"{self.signatures[gene]}|{kept}"
        if key not in self.measured:
            self.measured[key] = time_module(self.plan, gene, kept, self.batch, self.seq_len, self.repeats, self.device)
            if self.path is not None:
                atomic_write_text(self.path, json.dumps(self.measured))
        return self.measured[key]

    def total(self, kept: list) -> float:
        """Σ latency of every module at `kept` groups (summed in module order: deterministic)."""
        return sum(self(g, k) for g, k in enumerate(kept))

    def measured_rows(self) -> dict:
        """`{module name: {kept: seconds}}` of what was measured (empty for a given table)."""
        out: dict = {}
        for g, name in enumerate(self.names):
            prefix = self.signatures[g] + "|"
            row = {int(k[len(prefix):]): v for k, v in self.measured.items() if k.startswith(prefix)}
            if row:
                out[name] = dict(sorted(row.items()))
        return out
