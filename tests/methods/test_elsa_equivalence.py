"""ELSA results bit for bit: fixed tiny runs give the weights (and ADMM metrics) hashed at commit 512b989, before the
ADMM code was split into a solver file and an optimizer adapter (issue 20).

Run on one thread (float sums may be ordered differently with several); the hashes were taken on this project's CPU
machine (x86-64, torch 2.13 CPU).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.methods.admm import ADMMSettings, admm_optimizer_class

from ..helpers import make_model, requires_pinned_platform, sparsity_kwargs
from .test_elsa import FAST, learnable_ids

EXPECTED = {
    "elsa_llama_global_second_moment": "83f6f991c33198da725895aedc56cd3a87a3f31ea3405d573407ffbde8829190",
    "elsa_gpt2_2:4_cosine": "3faa2c6b3f67b37ac6195b6eb628e65155276259cfa12c0a99840112bd2890dc",
    "admm_plain_loop_slices_low_memory": "74dd1013047c3b7d812c75fe9a08750fa2a68ee667ed7453f5e05aabd294d1df",
    "admm_plain_loop_nm_exponential": "05c96ed21cd65cc904f0479f4790781b4f79d590fd117b76a1398960ed9c620b",
}


@pytest.fixture(autouse=True)
def one_thread():
    requires_pinned_platform()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digest(tensors, extra=None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=float).encode())
    return h.hexdigest()


def run_pruner(arch, structure, sparsity, **kwargs) -> str:
    ids = learnable_ids()
    model = make_model(arch)
    config = PruningConfig(method="elsa", **sparsity_kwargs(structure, sparsity), num_samples=ids.shape[0],
                           seq_len=ids.shape[1], batch_size=4,
                           method_kwargs={**FAST, "steps": 8, "interval": 2, **kwargs})
    pruner = SparsePruner(config)
    pruner.apply(model, dataset=ids, progress=False)
    history = [{k: v for k, v in e.items() if k.startswith("admm") or k == "loss"}
               for e in pruner.report.diagnostics["elsa"]["history"]]
    return digest(model.state_dict().values(), history)


def run_plain_loop(settings_kwargs, shapes, transposed=()) -> str:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    names = [f"w{i}" for i in range(len(params))]
    targets = [torch.randn(*s, generator=g) for s in shapes]
    settings = ADMMSettings(names=names, transposed=[names[i] for i in transposed], **settings_kwargs)
    optimizer = admm_optimizer_class(torch.optim.AdamW)([{"params": params, "admm": True}], lr=1e-2, admm=settings)
    metrics = []
    for _ in range(9):
        loss = sum(((p - t) ** 2 * (1 + t.abs())).sum() for p, t in zip(params, targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        metrics.append(dict(optimizer.admm_metrics))
    z_u = [optimizer._get(p)[i] for p in params for i in (0, 1)]
    masks = optimizer.final_projection()
    return digest(params + z_u + [masks[n] for n in names], metrics)


def test_elsa_llama_global_budget_second_moment():
    got = run_pruner("llama", "unstructured", 0.7, budget="global", projection="second_moment")
    assert got == EXPECTED["elsa_llama_global_second_moment"]


def test_elsa_gpt2_nm_cosine_schedule():
    got = run_pruner("gpt2", "2:4", 0.5, penalty_init=0.01, penalty_schedule="cosine")
    assert got == EXPECTED["elsa_gpt2_2:4_cosine"]


def test_admm_plain_loop_fused_expert_slices_low_memory():
    settings = dict(sparsities=[0.5, 0.6, 0.55], interval=2, penalty=0.1, low_memory=True, projection="second_moment",
                    slices={"w2": {"sparsities": [0.5, 0.6, 0.55], "transposed": False}})
    got = run_plain_loop(settings, [(8, 16), (16, 8), (3, 8, 16)], transposed=(1,))
    assert got == EXPECTED["admm_plain_loop_slices_low_memory"]


def test_admm_plain_loop_nm_exponential_schedule():
    settings = dict(sparsities=[0.5, 0.25], nm=(2, 4), interval=3, penalty=0.2, penalty_init=0.01,
                    penalty_schedule="exponential", total_steps=9, alpha=1.5)
    got = run_plain_loop(settings, [(8, 16), (16, 8)], transposed=(1,))
    assert got == EXPECTED["admm_plain_loop_nm_exponential"]
