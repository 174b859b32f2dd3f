"""`targets` / `ignore` grammar: class names (subclasses included), dotted name suffixes, `re:` regexes."""

import pytest
import torch

from optimum_sparse import PruningConfig, SparsePruner

from ..helpers import block_linears, make_ids, make_model, snapshot


def pruned_names(arch, **config_kwargs):
    model = make_model(arch)
    before = snapshot(model)
    pruner = SparsePruner(PruningConfig(method="magnitude", sparsity=0.5, **config_kwargs))
    pruner.apply(model, progress=False)
    after = model.state_dict()
    changed_keys = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.endswith(".weight") for k in changed_keys)  # only weights change
    changed = {k[: -len(".weight")] for k in changed_keys}
    assert changed == {r.name for r in pruner.report.layers}
    return changed


LLAMA = {f"model.layers.{i}.{n}" for i in range(2) for n in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("targets,ignore,expected", [
    (["Linear"], [], LLAMA),
    (["mlp.down_proj"], [], {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
    (["down_proj", "o_proj"], [], {f"model.layers.{i}.{n}" for i in range(2) for n in ("mlp.down_proj", "self_attn.o_proj")}),
    (["layers.1.mlp.up_proj"], [], {"model.layers.1.mlp.up_proj"}),
    ([r"re:layers\.1\.self_attn\.(q|v)_proj$"], [], {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
    (["Linear"], ["re:self_attn"], {n for n in LLAMA if ".mlp." in n}),
    (["Linear"], [r"re:^model\.layers\.0\."], {n for n in LLAMA if ".layers.1." in n}),
    (["re:mlp"], ["gate_proj", "up_proj"], {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),
    (["re:.*"], [], LLAMA),  # a catch-all still never reaches the embeddings or lm_head
], ids=["class", "suffix", "two-suffixes", "indexed-suffix", "regex", "ignore-suffix", "ignore-regex", "regex-minus-suffix", "catch-all"])
def test_llama_selection(targets, ignore, expected):
    assert pruned_names("llama", targets=targets, ignore=ignore) == expected


def test_suffix_matches_whole_components_only():
    with pytest.raises(ValueError, match="No linear layer"):
        pruned_names("llama", targets=["proj"])  # "o_proj" ends with "proj" but not with ".proj"


def test_gpt2_conv1d_by_class_and_by_default():
    by_class = pruned_names("gpt2", targets=["Conv1D"])
    assert len(by_class) == 8 and all(n.startswith("transformer.h.") for n in by_class)
    assert pruned_names("gpt2") == by_class
    assert pruned_names("gpt2", targets=["attn.c_proj"]) == {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}


def test_class_name_matches_subclasses():
    """Falcon's linears are `FalconLinear(nn.Linear)`: "Linear" selects them, and so does their own class name."""
    all_linears = set(block_linears(make_model("falcon")))
    assert len(all_linears) == 8
    assert pruned_names("falcon") == all_linears
    assert pruned_names("falcon", targets=["Linear"]) == all_linears
    assert pruned_names("falcon", targets=["FalconLinear"]) == all_linears
    with pytest.raises(ValueError, match="No linear layer"):
        pruned_names("falcon", ignore=["Linear"])


def test_phi3_fused_projections():
    names = pruned_names("phi3", targets=["mlp.gate_up_proj", "qkv_proj"])
    assert names == {f"model.layers.{i}.{n}" for i in range(2) for n in ("mlp.gate_up_proj", "self_attn.qkv_proj")}


def test_selection_with_calibration_method():
    model = make_model("opt")
    pruner = SparsePruner(PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=16, targets=["fc1", "fc2"]))
    pruner.apply(model, dataset=make_ids(), progress=False)
    assert {r.name for r in pruner.report.layers} == {f"model.decoder.layers.{i}.{n}" for i in range(2) for n in ("fc1", "fc2")}
    for name, module in block_linears(model).items():
        zeros = int((module.weight == 0).sum())
        assert zeros == (module.weight.numel() // 2 if name.endswith(("fc1", "fc2")) else 0), name
