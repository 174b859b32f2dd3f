"""Structured MoE runs (whole-expert removal, expert channels) on the block engine: sequential statistics, offloaded
blocks, resumed runs and several processes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate import cpu_offload
from transformers import AutoModelForCausalLM

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.engine.checkpoint import CheckpointMismatchError
from optimum_sparse.structured.expert_channels import ExpertChannelStructure
from optimum_sparse.structured.experts import (
    ExpertRemovalStructure, collect_expert_stats, plan_expert_removal, remove_experts, run_expert_removal,
)

from ..helpers import make_ids
from .helpers import cli_model, make_moe, one_and_two_processes

STRUCTURES = {"experts": ExpertRemovalStructure, "expert-channels": ExpertChannelStructure}


def _config(structure="experts", sparsity=0.5, **kwargs):
    method = "expert-removal" if structure == "experts" else "expert-channels"
    return PruningConfig(method=method, structure=structure, sparsity=sparsity, num_samples=8, seq_len=16,
                         batch_size=4, **kwargs)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _prune(model, structure="experts", **kwargs):
    pruner = SparsePruner(_config(structure, **{k: v for k, v in kwargs.items() if k == "method_kwargs"}))
    pruner.apply(model, dataset=make_ids(8), progress=False,
                 **{k: v for k, v in kwargs.items() if k in ("checkpoint_dir", "resume")})
    return pruner


def test_statistics_of_a_block_come_from_the_pruned_predecessors():
    ids = make_ids(8)
    config = _config()
    model = make_moe("qwen3_moe")
    report, _ = run_expert_removal(model, SparsePruner(config).method, config, ids, progress=False)
    kept0 = torch.tensor(report.blocks[0]["kept_experts"])

    dense = make_moe("qwen3_moe")
    dense_stats = collect_expert_stats(dense, plan_expert_removal(dense, config), ids, 4, progress=False)[1]
    plan = plan_expert_removal(dense, config)
    remove_experts(plan.layers[0], kept0)  # block 0 as the run left it, block 1 still dense
    expected = collect_expert_stats(dense, plan, ids, 4, progress=False)[1]
    assert report.blocks[1]["tokens"] == [int(t) for t in expected.tokens]
    torch.testing.assert_close(torch.tensor(report.blocks[1]["contribution"], dtype=torch.float64),
                               expected.contribution, rtol=1e-6, atol=0)
    assert not torch.allclose(expected.contribution, dense_stats.contribution)  # not the dense one-pass statistics
    assert report.diagnostics["expert_removal"]["statistics"] == "sequential"


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3", "llama4_text"])
def test_disk_offloaded_blocks_prune_like_in_memory(model_type, structure, tmp_path):
    make_moe(model_type).save_pretrained(tmp_path / "dense")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    expected_report = _prune(reference, structure).report

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32, device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    assert {p.device.type for p in model.model.layers[1].parameters()} == {"meta"}  # the MoE block 1 is offloaded
    pruner = _prune(model, structure)
    assert pruner.report.blocks == expected_report.blocks
    ids = make_ids(2, seed=3)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)  # forward reads the map
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    field = pruner.structured_summary["config_field"]
    assert getattr(reloaded.config, field) == getattr(reference.config, field) < getattr(make_moe(model_type).config,
                                                                                          field)
    state = reloaded.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(state[name], value), name
    torch.testing.assert_close(_logits(reloaded, ids), _logits(reference, ids), rtol=0, atol=0)


def test_reconstruction_criterion_on_offloaded_blocks(tmp_path):
    kwargs = {"method_kwargs": {"criterion": "reconstruction"}}
    make_moe("qwen3_moe").save_pretrained(tmp_path / "dense")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    expected = _prune(reference, **kwargs).report
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  "model.layers.0": "disk", "model.layers.1": "disk"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32, device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    pruner = _prune(model, **kwargs)
    assert pruner.report.blocks == expected.blocks and "reconstruction_path" in expected.blocks[0]
    ids = make_ids(2, seed=3)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)


@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_cpu_offload_state_dict_storage_gets_the_new_shapes(structure, tmp_path):
    reference = make_moe("qwen2_moe")
    _prune(reference, structure)
    model = make_moe("qwen2_moe")
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    _prune(model, structure)
    weights_map = model.model.layers[0].mlp.experts._hf_hook.weights_map.dataset
    for name, value in reference.state_dict().items():
        if name in weights_map:
            assert torch.equal(weights_map[name], value), name
    ids = make_ids(2, seed=3)
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=0, atol=0)


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("structure,model_type", [("experts", "qwen3_moe"), ("expert-channels", "deepseek_v3"),
                                                  ("expert-channels", "qwen3_moe")])
def test_interrupted_then_resumed_equals_uninterrupted(structure, model_type, tmp_path, monkeypatch):
    reference = make_moe(model_type)
    expected = _prune(reference, structure).report
    cls = STRUCTURES[structure]
    original = cls.decide
    last = max(b.get("index", -1) for b in expected.blocks)

    def killed_at_last(self, layer, stats):
        if layer.index == last:
            raise Killed()
        return original(self, layer, stats)

    model = make_moe(model_type)
    with monkeypatch.context() as patch:
        patch.setattr(cls, "decide", killed_at_last)
        with pytest.raises(Killed):
            _prune(model, structure, checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["next_block"] == last

    fresh = make_moe(model_type)
    pruner = _prune(fresh, structure, checkpoint_dir=tmp_path, resume=True)
    state = fresh.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(state[name], value), name
    assert pruner.report.blocks == expected.blocks
    assert [r.to_dict() for r in pruner.report.layers] == [r.to_dict() for r in expected.layers]
    assert fresh.config.to_dict() == reference.config.to_dict()


def test_a_checkpoint_of_other_weights_or_settings_is_refused_before_any_change(tmp_path, monkeypatch):
    original = ExpertRemovalStructure.decide

    def killed_at_1(self, layer, stats):
        if layer.index == 1:
            raise Killed()
        return original(self, layer, stats)

    with monkeypatch.context() as patch:
        patch.setattr(ExpertRemovalStructure, "decide", killed_at_1)
        with pytest.raises(Killed):
            _prune(make_moe("qwen3_moe"), checkpoint_dir=tmp_path)

    other = make_moe("qwen3_moe")
    with torch.no_grad():  # a fine-tune of the same shape: block 0's experts differ
        other.model.layers[0].mlp.experts.down_proj.mul_(1.01)
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="dense weights of block 0"):
        _prune(other, checkpoint_dir=tmp_path, resume=True)
    for name, value in other.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert other.config.num_experts == 4

    with pytest.raises(CheckpointMismatchError, match="config"):  # another sparsity
        SparsePruner(_config(sparsity=0.25)).apply(make_moe("qwen3_moe"), dataset=make_ids(8), progress=False,
                                                   checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(FileExistsError):  # a folder holding a checkpoint, without resume
        _prune(make_moe("qwen3_moe"), checkpoint_dir=tmp_path)


RUNS = (*STRUCTURES, "reconstruction")


def _run(tag, out_dir):
    for structure in RUNS:  # one spawn for every run: process start-up dominates the test's time
        model = make_moe("deepseek_v3" if structure == "expert-channels" else "qwen3_moe")
        kwargs = {"method_kwargs": {"criterion": "reconstruction"}} if structure == "reconstruction" else {}
        pruner = _prune(model, "experts" if structure == "reconstruction" else structure, **kwargs)
        torch.save({"state": model.state_dict(), "blocks": pruner.report.blocks},
                   os.path.join(out_dir, f"{structure}-{tag}.pt"))


def _close(a, b):
    """Report entries equal, float sums up to summation order (they were added in another order)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-9 * max(1.0, abs(a))
    return a == b


def test_two_processes_with_half_the_data_each_equal_one(tmp_path):
    """Removal by contribution and by reconstruction (Qwen3-MoE), expert channels (DeepSeek-V3, coupled shared expert)."""
    one_and_two_processes(_run, tmp_path, str(tmp_path))
    for structure in RUNS:
        single = torch.load(tmp_path / f"{structure}-single.pt")
        for rank in range(2):
            saved = torch.load(tmp_path / f"{structure}-rank{rank}.pt")
            assert _close(saved["blocks"], single["blocks"]), structure  # statistics summed over both ranks
            assert saved["state"].keys() == single["state"].keys()
            for name, expected in single["state"].items():
                assert torch.equal(saved["state"][name], expected), f"{structure}, rank {rank}: {name} differs"


def test_cli_checkpoint_dir_and_resume_of_a_finished_run(tmp_path, tokenizer):
    from optimum_sparse.cli.main import main

    dense, calib = cli_model(tmp_path, tokenizer)
    args = ["prune", "--model", dense, "--method", "expert-channels", "--structure",
            "expert-channels", "--sparsity", "0.5", "--num-samples", "4", "--seq-len", "16", "--dataset",
            calib, "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["next_block"] == 2
    assert main([*args, "--resume", "--output", str(tmp_path / "again")]) == 0  # every block re-applied, none run
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert again.config.moe_intermediate_size == 8
    for name, value in first.items():
        assert torch.equal(again.state_dict()[name], value), name
