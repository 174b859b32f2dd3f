"""Mixture-of-experts models through the engine's resumable, offloaded and multi-process runs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.methods.sparsegpt import SparseGPTPruning

from ..helpers import make_ids
from .helpers import cli_model, make_moe, one_and_two_processes


def _config(method="sparsegpt", **kwargs):
    return PruningConfig(method=method, sparsity=0.5, num_samples=4, seq_len=16, batch_size=2, **kwargs)


class Killed(RuntimeError):
    pass


def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    reference = make_moe("qwen2_moe")
    SparsePruner(_config()).apply(reference, dataset=make_ids(), progress=False)

    model = make_moe("qwen2_moe")
    original = SparseGPTPruning.prune_block

    def killed_at_1(self, job):
        if job.index == 1:
            raise Killed()
        return original(self, job)

    with monkeypatch.context() as patch:
        patch.setattr(SparseGPTPruning, "prune_block", killed_at_1)
        with pytest.raises(Killed):
            SparsePruner(_config()).apply(model, dataset=make_ids(), progress=False, checkpoint_dir=tmp_path)
    assert json.loads((tmp_path / "state.json").read_text())["next_block"] == 1

    fresh = make_moe("qwen2_moe")
    pruner = SparsePruner(_config())
    pruner.apply(fresh, dataset=make_ids(), progress=False, checkpoint_dir=tmp_path, resume=True)
    for name, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert pruner.report.mean_sparsity == pytest.approx(0.5)
    assert any(".experts.3.down_proj" in r.name for r in pruner.report.layers if r.name.startswith("model.layers.0"))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_offloaded_blocks_prune_like_in_memory(model_type, tmp_path):
    make_moe(model_type).save_pretrained(tmp_path / "dense")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    SparsePruner(_config()).apply(reference, dataset=make_ids(), progress=False)

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32, device_map=device_map,
                                                 offload_folder=tmp_path / "offload")
    assert model.model.layers[1].mlp.experts.down_proj.device.type == "meta"
    pruner = SparsePruner(_config())
    pruner.apply(model, dataset=make_ids(), progress=False)
    assert pruner.report.mean_sparsity == pytest.approx(reference_sparsity(reference), abs=1e-12)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(reloaded[name], value), name


def reference_sparsity(model) -> float:
    zeros = total = 0
    for name, p in model.named_parameters():
        if ".layers." in name and ("experts" in name or name.endswith("_proj.weight")) and "bias" not in name:
            zeros, total = zeros + int((p == 0).sum()), total + p.numel()
    return zeros / total


def _run(tag, out_dir):
    model = make_moe("mixtral")
    pruner = SparsePruner(_config("sparsegpt"))
    pruner.apply(model, dataset=make_ids(), progress=False)
    tokens = {r.name: r.extra.get("routed_tokens") for r in pruner.report.layers}
    torch.save({"state": model.state_dict(), "tokens": tokens}, os.path.join(out_dir, f"{tag}.pt"))


def test_two_processes_equal_one(tmp_path):
    one_and_two_processes(_run, tmp_path, str(tmp_path))
    single = torch.load(tmp_path / "single.pt")
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["tokens"] == single["tokens"]  # per-expert token counts all-reduced
        for name, expected in single["state"].items():
            assert torch.equal(saved["state"][name], expected), f"rank {rank}: {name} differs"


def test_cli_prunes_a_moe_model_with_the_expert_settings(tmp_path, tokenizer):
    from optimum_sparse.cli.main import main

    dense, calib = cli_model(tmp_path, tokenizer)
    code = main(["prune", "--model", dense, "--method", "wanda", "--num-samples", "4",
                 "--seq-len", "16", "--dataset", calib, "--expert-statistics", "pooled",
                 "--min-expert-tokens", "4", "--expert-fallback", "damping", "--output", str(tmp_path / "out")])
    assert code == 0
    saved = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert (saved["expert_statistics"], saved["min_expert_tokens"], saved["expert_fallback"]) == ("pooled", 4, "damping")
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["inventory"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    experts = [r for r in report["layers"] if ".experts." in r["name"]]
    assert len(experts) == 16 and all(r["expert_statistics"] == "pooled" for r in experts)
