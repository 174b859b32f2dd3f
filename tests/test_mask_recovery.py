"""One mask recovery for live models and saved folders (issue 20), experts included, and the legacy Mixtral names
(issue 17): a tiny pruned Mixtral's masks are recovered from its checkpoint whether the experts are saved as
transformers writes them (`block_sparse_moe.experts.<e>.w1/w2/w3.weight`), fused (`mlp.experts.gate_up_proj`) or split
per expert (`mlp.experts.<e>.gate_proj/up_proj/down_proj.weight`), equal to the fused parameters' zeros; the live and
the file paths apply the same recorded-sparsity tolerance (one weight)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from optimum_sparse.engine.experts import find_experts_modules
from optimum_sparse.integrations import recover_masks
from optimum_sparse.serialization import load_pruning_record
from optimum_sparse.serialization.masks import CheckpointSource, short_of_record

from .helpers import make_model
from .moe.helpers import make_moe
from .moe.test_moe_pruning import _prune


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    model = make_moe("mixtral")
    pruner = _prune(model, "sparsegpt")
    folder = tmp_path_factory.mktemp("mixtral") / "saved"
    pruner.save_pretrained(model, folder, model_card=False)
    return model, pruner, folder


def fused_zeros(model) -> dict:
    """`{record name: param[e] == 0}` of every expert projection, from the live fused parameters (stored layout)."""
    out = {}
    for i, block in enumerate(model.model.layers):
        for name, (module, layout) in find_experts_modules(block).items():
            for projection in layout.projections:
                param = getattr(module, projection).detach()
                for e in range(param.shape[0]):
                    out[f"model.layers.{i}.{name}.{e}.{projection}"] = param[e] == 0
    return out


def rewrite(folder, target, layout):
    """Copies `folder` to `target` with the experts' tensors renamed to `layout` ("fused" or "split")."""
    os.makedirs(target)
    for name in os.listdir(folder):
        if not name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
                dst.write(src.read())
    weights = load_file(os.path.join(folder, "model.safetensors"))
    out, gate_up, down = {}, {}, {}
    for key, tensor in weights.items():
        parts = key.split(".")
        if "block_sparse_moe" in parts and "experts" in parts:
            i, e, w = int(parts[2]), int(parts[5]), parts[6]
            (down if w == "w2" else gate_up).setdefault(i, {}).setdefault(e, {})[w] = tensor
        else:
            out[key.replace(".block_sparse_moe.", ".mlp.")] = tensor
    for i in gate_up:
        prefix = f"model.layers.{i}.mlp.experts"
        experts = sorted(gate_up[i])
        if layout == "fused":
            out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([gate_up[i][e]["w1"], gate_up[i][e]["w3"]])
                                                         for e in experts])
            out[f"{prefix}.down_proj"] = torch.stack([down[i][e]["w2"] for e in experts])
        else:
            for e in experts:
                out[f"{prefix}.{e}.gate_proj.weight"] = gate_up[i][e]["w1"]
                out[f"{prefix}.{e}.up_proj.weight"] = gate_up[i][e]["w3"]
                out[f"{prefix}.{e}.down_proj.weight"] = down[i][e]["w2"]
    save_file(out, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})


def test_transformers_saves_mixtral_experts_under_the_legacy_names(mixtral):
    _, _, folder = mixtral
    keys = set(load_file(os.path.join(folder, "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


@pytest.mark.parametrize("layout", ["legacy", "fused", "split"])
def test_masks_from_every_expert_layout_equal_the_fused_zeros(mixtral, tmp_path, layout):
    model, pruner, folder = mixtral
    if layout != "legacy":
        rewrite(folder, tmp_path / layout, layout)
        folder = tmp_path / layout
    record = load_pruning_record(folder)
    expected = fused_zeros(model)
    assert set(expected) <= set(record.masks)
    for name, zeros in expected.items():
        assert torch.equal(record.masks[name], zeros), name
    assert set(record.masks) == {layer.name for layer in pruner.record.layers}  # attention too, nothing missing


@pytest.mark.parametrize("model_type", ["phimoe", "granitemoe", "olmoe", "gpt_oss"])
def test_other_saved_expert_layouts(model_type, tmp_path):
    """Phi-MoE (legacy w1/w2/w3), Granite-MoE (`input_linear`/`output_linear`, renamed by transformers' table), OLMoE
    (split per expert), gpt-oss (fused, transposed): every expert's mask equals the fused parameter's zeros."""
    model = make_moe(model_type)
    pruner = _prune(model, "magnitude")
    pruner.save_pretrained(model, tmp_path, model_card=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no weight for pruned layer" warning
        record = load_pruning_record(tmp_path)
    expected = fused_zeros(model)
    assert expected and set(record.masks) == {layer.name for layer in pruner.record.layers}
    for name, zeros in expected.items():
        assert torch.equal(record.masks[name], zeros), name


def test_legacy_names_come_from_transformers_conversion_table(mixtral):
    _, _, folder = mixtral
    source = CheckpointSource(str(folder))
    parts = source.parts[("model.layers.0.mlp.experts.gate_up_proj", 1)]
    assert parts == {0: "model.layers.0.block_sparse_moe.experts.1.w1.weight",
                     1: "model.layers.0.block_sparse_moe.experts.1.w3.weight"}  # gate (w1) before up (w3)
    assert source.parts[("model.layers.1.mlp.experts.down_proj", 0)] == {
        0: "model.layers.1.block_sparse_moe.experts.0.w2.weight"}
    # without the model type (no conversion table) the legacy names are not guessed
    assert CheckpointSource(str(folder), model_type="llama").get("model.layers.0.mlp.experts.1.gate_up_proj") is None


def test_live_recovery_covers_the_experts_and_checks_the_files_masks(mixtral):
    model, pruner, folder = mixtral
    live = recover_masks(model, record=pruner)
    for name, zeros in fused_zeros(model).items():
        assert torch.equal(~live[name].keep, zeros), name
    from_files = recover_masks(model, record=load_pruning_record(folder))  # stored masks checked against the model
    assert set(from_files) == set(live)
    assert all(torch.equal(from_files[n].keep, live[n].keep) for n in live)


def test_one_tolerance_for_both_paths(tmp_path):
    from optimum_sparse import PruningConfig, SparsePruner

    from .helpers import make_ids

    model = make_model("llama")
    pruner = SparsePruner(PruningConfig(method="magnitude", sparsity=0.5))
    pruner.apply(model, dataset=make_ids(), progress=False)
    name = "model.layers.0.mlp.down_proj"
    weight = model.get_submodule(name).weight
    zeros = torch.nonzero(weight.detach().flatten() == 0).flatten()
    recorded = next(layer.sparsity for layer in pruner.record.layers if layer.name == name)
    assert not short_of_record(weight == 0, recorded)
    with torch.no_grad():
        weight.view(-1)[zeros[0]] = 1.0  # one weight fewer than recorded: within the tolerance
    assert not short_of_record(weight == 0, recorded)
    recover_masks(model, record=pruner)
    pruner.save_pretrained(model, tmp_path / "one", model_card=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pruning_record(tmp_path / "one")
    with torch.no_grad():
        weight.view(-1)[zeros[1]] = 1.0  # two: refused by the live path, warned about by the file path
    assert short_of_record(weight == 0, recorded)
    with pytest.raises(ValueError, match="down_proj: the pruning record says"):
        recover_masks(model, record=pruner)
    pruner.save_pretrained(model, tmp_path / "two", model_card=False)
    with pytest.warns(UserWarning, match="down_proj.*fewer than the recorded"):
        load_pruning_record(tmp_path / "two")
