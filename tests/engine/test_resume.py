"""Checkpointed runs: a killed run resumed from its checkpoint ends with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from optimum_sparse import CheckpointMismatchError, PruningConfig, SparsePruner
from optimum_sparse.methods.sparsegpt import SparseGPTPruning
from optimum_sparse.methods.sparsellm import SparseLLMPruning

from ..helpers import assert_state_unchanged, make_ids, make_model, snapshot

NUM_LAYERS = 4


class Killed(RuntimeError):
    pass


def _config(method="sparsegpt", sparsity=0.5, **kwargs):
    return PruningConfig(method=method, sparsity=sparsity, num_samples=4, seq_len=16, **kwargs)


def _kill_at(monkeypatch, method_class, block_index):
    original = method_class.prune_block

    def prune_block(self, job):
        if job.index == block_index:
            raise Killed(f"killed at block {block_index}")
        return original(self, job)

    monkeypatch.setattr(method_class, "prune_block", prune_block)


@pytest.mark.parametrize("arch,method,method_class", [
    ("llama", "sparsegpt", SparseGPTPruning), ("gpt2", "sparsegpt", SparseGPTPruning),
    ("qwen2", "sparsellm", SparseLLMPruning),
])
def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch, arch, method, method_class):
    ids = make_ids()
    uninterrupted = make_model(arch, num_layers=NUM_LAYERS)
    reference = SparsePruner(_config(method))
    reference.apply(uninterrupted, dataset=ids, progress=False)

    model = make_model(arch, num_layers=NUM_LAYERS)
    with monkeypatch.context() as patch:
        _kill_at(patch, method_class, 2)
        with pytest.raises(Killed):
            SparsePruner(_config(method)).apply(model, dataset=ids, progress=False, checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["next_block"] == 2

    fresh = make_model(arch, num_layers=NUM_LAYERS)  # a new process: the dense model again
    pruned_blocks = []
    original = method_class.prune_block
    monkeypatch.setattr(method_class, "prune_block", lambda self, job: (pruned_blocks.append(job.index), original(self, job)))
    pruner = SparsePruner(_config(method))
    pruner.apply(fresh, dataset=ids, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert pruned_blocks == [2, 3]  # blocks 0 and 1 come from the checkpoint
    for (name, value), expected in zip(fresh.state_dict().items(), uninterrupted.state_dict().values()):
        assert torch.equal(value, expected), name
    assert [b["index"] for b in pruner.report.blocks] == list(range(NUM_LAYERS))
    assert [r.name for r in pruner.report.layers] == [r.name for r in reference.report.layers]
    assert pruner.report.mean_sparsity == pytest.approx(reference.report.mean_sparsity)


def test_checkpoint_of_another_config_or_model_is_refused_before_any_change(tmp_path):
    ids = make_ids()
    SparsePruner(_config()).apply(make_model("llama", num_layers=2), dataset=ids, progress=False, checkpoint_dir=tmp_path)
    for config, model, data in [
        (_config(sparsity=0.6), make_model("llama", num_layers=2), ids),
        (_config(method="wanda"), make_model("llama", num_layers=2), ids),
        (_config(), make_model("llama", num_layers=3), ids),
        (_config(), make_model("llama", num_layers=2), make_ids(seed=1)),
    ]:
        before = snapshot(model)
        with pytest.raises(CheckpointMismatchError, match="different run"):
            SparsePruner(config).apply(model, dataset=data, progress=False, checkpoint_dir=tmp_path, resume=True)
        assert_state_unchanged(model, before)


def test_existing_checkpoint_without_resume_is_refused(tmp_path):
    ids = make_ids()
    SparsePruner(_config()).apply(make_model("llama", num_layers=2), dataset=ids, progress=False, checkpoint_dir=tmp_path)
    model = make_model("llama", num_layers=2)
    before = snapshot(model)
    with pytest.raises(FileExistsError, match="resume=True"):
        SparsePruner(_config()).apply(model, dataset=ids, progress=False, checkpoint_dir=tmp_path)
    assert_state_unchanged(model, before)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        SparsePruner(_config()).apply(model, dataset=ids, progress=False, resume=True)


def test_resuming_a_finished_run_only_restores_it(tmp_path):
    ids = make_ids()
    done = make_model("llama", num_layers=2)
    SparsePruner(_config()).apply(done, dataset=ids, progress=False, checkpoint_dir=tmp_path)
    again = make_model("llama", num_layers=2)
    SparsePruner(_config()).apply(again, dataset=ids, progress=False, checkpoint_dir=tmp_path, resume=True)
    for (name, value), expected in zip(again.state_dict().items(), done.state_dict().values()):
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("where", ["block0", "block1", "embeddings"])
def test_resume_with_a_fine_tuned_variant_is_refused(tmp_path, monkeypatch, where):
    """Same config, class and shapes, other dense weights: refused before any block is replaced (issue 18.1)."""
    ids = make_ids()
    with monkeypatch.context() as patch:
        _kill_at(patch, SparseGPTPruning, 2)
        with pytest.raises(Killed):
            SparsePruner(_config()).apply(make_model("llama", num_layers=NUM_LAYERS), dataset=ids, progress=False,
                                          checkpoint_dir=tmp_path)
    variant = make_model("llama", num_layers=NUM_LAYERS)
    with torch.no_grad():
        if where == "embeddings":
            variant.model.embed_tokens.weight[3, 0] += 1e-3
        else:
            variant.model.layers[int(where[-1])].mlp.down_proj.weight[0, 0] += 1e-3  # one weight of a "fine-tune"
    before = snapshot(variant)
    match = "embeddings" if where == "embeddings" else rf"dense weights of block {where[-1]} differ"
    with pytest.raises(CheckpointMismatchError, match=match):
        SparsePruner(_config()).apply(variant, dataset=ids, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert_state_unchanged(variant, before)
