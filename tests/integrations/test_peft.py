"""LoRA on pruned models: masked merge, training-time masking, adapter save/load, bad input.

Tiny random Llama (hidden 32, 2 blocks), pruned by magnitude (no calibration): fast on 2 CPU cores.
"""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from optimum_sparse import PruningConfig, SparsePruner, mask_lora_updates, merge_and_unload_sparse  # noqa: E402
from optimum_sparse.integrations import (  # noqa: E402
    AdapterMismatchError,
    MaskedLoraVariant,
    NotPrunedError,
    finetune,
    is_masked,
    load_sparse_adapter,
    recover_masks,
    unmask_lora_updates,
)
from optimum_sparse.integrations.peft import MaskedLoraLinear  # noqa: E402

from ..helpers import block_linears, make_ids, make_model, snapshot  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STRUCTURES = ["unstructured", "2:4"]


def pruned_model(structure: str = "unstructured", arch: str = "llama", seed: int = 0, sparsity: float = 0.5):
    model = make_model(arch, seed=seed)
    pruner = SparsePruner(PruningConfig(method="magnitude", sparsity=sparsity, structure=structure))
    pruner.apply(model, progress=False)
    return model, pruner


def lora(model, seed: int = 1, **kwargs):
    """A LoRA model with random (non-zero) B, so the update is not zero before training."""
    torch.manual_seed(seed)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    config.update(kwargs)
    return get_peft_model(model, LoraConfig(**config))


def layer_stats(model) -> dict[str, tuple[int, int]]:
    """{name: (zeros, numel)} of every decoder linear."""
    return {name: (int((m.weight == 0).sum()), m.weight.numel()) for name, m in block_linears(model).items()}


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_pruned_are_plus_zero(model, zero_positions: dict[str, torch.Tensor]) -> None:
    for name, module in block_linears(model).items():
        pruned = module.weight.detach()[zero_positions[name]]
        assert torch.all(pruned == 0), name
        assert not torch.signbit(pruned).any(), f"{name}: -0.0 among the pruned weights"


# ----- mask recovery ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_recover_masks_from_zeros(structure):
    model, pruner = pruned_model(structure)
    masks = recover_masks(model)
    assert set(masks) == {r.name for r in pruner.report.layers}
    for mask in masks.values():
        assert mask.structure == structure
        assert mask.sparsity == pytest.approx(0.5)


def test_recover_masks_from_record(tmp_path):
    model, pruner = pruned_model()
    pruner.save_pretrained(model, tmp_path)
    masks = recover_masks(model, record=tmp_path)
    assert set(masks) == {r.name for r in pruner.report.layers}
    assert set(recover_masks(model, record=pruner)) == set(masks)
    # a record that does not match the weights
    dense = make_model("llama")
    with pytest.raises(ValueError, match="pruning record says"):
        recover_masks(dense, record=tmp_path)


# ----- (a) masked merge --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_masked_merge_keeps_every_pruned_weight_zero(structure):
    model, _ = pruned_model(structure)
    before = layer_stats(model)
    zeros = {name: m.weight == 0 for name, m in block_linears(model).items()}
    weights = snapshot(model)
    peft_model = lora(model)  # an adapter trained *without* masking: its update covers pruned weights too
    deltas = {name.replace("base_model.model.", "").replace(".base_layer", ""): layer.get_delta_weight("default")
              for name, layer in peft_model.named_modules() if hasattr(layer, "get_delta_weight")}
    assert all((d[zeros[n]] != 0).any() for n, d in deltas.items())
    merged = merge_and_unload_sparse(peft_model)
    assert not isinstance(merged, PeftModel)
    assert layer_stats(merged) == before
    assert_pruned_are_plus_zero(merged, zeros)
    for name, module in block_linears(merged).items():  # kept weights got W + ΔW
        keep = ~zeros[name]
        expected = weights[f"{name}.weight"] + deltas[name]
        torch.testing.assert_close(module.weight[keep], expected[keep])
    if structure == "2:4":
        for name, module in block_linears(merged).items():
            groups = (module.weight == 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
            assert groups.min() >= 2, name


def test_plain_peft_merge_destroys_sparsity():  # the problem this module solves
    model, _ = pruned_model()
    merged = lora(model).merge_and_unload()
    assert all(z < n // 2 for z, n in layer_stats(merged).values())


# ----- (b) training-time masking -----------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_masked_adapter_equals_merged_model(structure):
    model, _ = pruned_model(structure)
    before = layer_stats(model)
    peft_model = lora(model)
    masks = mask_lora_updates(peft_model)
    assert len(masks) == len(before)
    layers = [m for m in peft_model.modules() if isinstance(m, MaskedLoraLinear)]
    assert len(layers) == len(before) and all(is_masked(m) for m in layers)
    ids = make_ids()
    finetune(peft_model, ids, steps=3, batch_size=4, learning_rate=5e-3, progress=False)
    adapter_logits = logits(peft_model, ids)
    merged = merge_and_unload_sparse(peft_model)
    assert layer_stats(merged) == before
    torch.testing.assert_close(logits(merged, ids), adapter_logits, rtol=0, atol=1e-5)


def test_masked_forward_matches_variant_and_dropout_path():
    """The fused forward, peft's variant path and an explicit (W + ΔW ⊙ M) agree; dropout in training works."""
    model, _ = pruned_model()
    zeros = {n: m.weight == 0 for n, m in block_linears(model).items()}
    peft_model = lora(model, lora_dropout=0.1)
    mask_lora_updates(peft_model)
    ids = make_ids()
    fused = logits(peft_model, ids)  # eval: dropout off, fused path
    layer = next(m for m in peft_model.modules() if isinstance(m, MaskedLoraLinear))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        explicit = layer.base_layer(x) + x @ layer.get_delta_weight("default").masked_fill(layer.sparse_lora_pruned, 0).T
        variant = MaskedLoraVariant.forward(layer, "default", x, layer.base_layer(x))
        torch.testing.assert_close(layer(x), explicit, rtol=0, atol=1e-5)
        torch.testing.assert_close(variant, explicit, rtol=0, atol=1e-5)
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss  # dropout path (variant forward)
    loss.backward()
    assert layer.lora_A["default"].weight.grad is not None
    # peft's own merge/unmerge go through the variant and keep the zeros
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, ids), fused, rtol=0, atol=1e-5)
    peft_model.unmerge_adapter()
    assert all(torch.all(m.get_base_layer().weight[zeros[n.replace("base_model.model.", "")]] == 0)
               for n, m in peft_model.named_modules() if isinstance(m, MaskedLoraLinear))


def test_training_loss_decreases():
    model, _ = pruned_model()
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    mask_lora_updates(peft_model)
    ids = make_ids(num_samples=4)
    result = finetune(peft_model, ids, steps=12, batch_size=4, learning_rate=3e-2, warmup_steps=1, progress=False,
                      eval_fn=lambda m: float(m(input_ids=ids, labels=ids).loss), eval_every=12)
    assert result.steps == 12 and len(result.losses) == 12
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.1
    assert [e["step"] for e in result.evaluations] == [0, 12]
    assert result.evaluations[-1]["value"] < result.evaluations[0]["value"]


def test_transformers_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, _ = pruned_model()
    before = layer_stats(model)
    peft_model = lora(model)
    mask_lora_updates(peft_model)
    ids = make_ids(num_samples=8)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=peft_model, args=args, train_dataset=data).train()
    assert all(is_masked(m) for m in peft_model.modules() if isinstance(m, MaskedLoraLinear))
    adapter_logits = logits(peft_model, ids)
    merged = merge_and_unload_sparse(peft_model)
    assert layer_stats(merged) == before
    torch.testing.assert_close(logits(merged, ids), adapter_logits, rtol=0, atol=1e-5)


# ----- save / load -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", ["peft", "helper"])
def test_saved_adapter_reloads_onto_pruned_base(tmp_path, loader):
    model, _ = pruned_model("2:4")
    peft_model = lora(model)
    mask_lora_updates(peft_model)
    ids = make_ids()
    finetune(peft_model, ids, steps=2, batch_size=4, learning_rate=5e-3, progress=False)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"  # peft's own format, nothing added

    base, _ = pruned_model("2:4")
    before = layer_stats(base)
    if loader == "peft":
        reloaded = PeftModel.from_pretrained(base, tmp_path)
        mask_lora_updates(reloaded)
    else:
        reloaded = load_sparse_adapter(base, tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-5)
    merged = merge_and_unload_sparse(reloaded)
    assert layer_stats(merged) == before
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-5)


def test_unmask_restores_plain_lora():
    model, _ = pruned_model()
    peft_model = lora(model)
    ids = make_ids()
    plain = logits(peft_model, ids)
    mask_lora_updates(peft_model)
    assert not torch.allclose(logits(peft_model, ids), plain)
    unmask_lora_updates(peft_model)
    torch.testing.assert_close(logits(peft_model, ids), plain)
    assert not any(isinstance(m, MaskedLoraLinear) for m in peft_model.modules())


def test_gpt2_conv1d_fan_in_fan_out():
    model, _ = pruned_model(arch="gpt2")
    before = layer_stats(model)
    peft_model = lora(model, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    mask_lora_updates(peft_model)
    ids = make_ids()
    expected = logits(peft_model, ids)
    merged = merge_and_unload_sparse(peft_model)
    assert layer_stats(merged) == before
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-5)


# ----- bad input ---------------------------------------------------------------------------------------------------
def test_non_pruned_base_is_an_error():
    dense = make_model("llama")
    with pytest.raises(NotPrunedError, match="is pruned"):
        mask_lora_updates(lora(dense))
    with pytest.raises(NotPrunedError):
        merge_and_unload_sparse(lora(make_model("llama")))


def test_not_a_peft_model_is_an_error():
    model, _ = pruned_model()
    with pytest.raises(TypeError, match="peft model with LoRA"):
        merge_and_unload_sparse(model)


def test_dora_is_rejected():
    model, _ = pruned_model()
    with pytest.raises(TypeError, match="DoraLinearVariant"):
        mask_lora_updates(lora(model, use_dora=True))


def _saved_adapter(tmp_path, arch="llama", **kwargs):
    model, _ = pruned_model(arch=arch)
    peft_model = lora(model, **kwargs)
    peft_model.save_pretrained(tmp_path)
    return tmp_path


def test_adapter_for_another_base_shape_mismatch(tmp_path):
    adapter = _saved_adapter(tmp_path)
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    other = transformers.AutoModelForCausalLM.from_config(config)
    SparsePruner(PruningConfig(method="magnitude", sparsity=0.5)).apply(other, progress=False)
    with pytest.raises(AdapterMismatchError, match="adapter input size 32, base layer 64"):
        load_sparse_adapter(other, adapter)


def test_adapter_for_another_base_name_mismatch(tmp_path):
    adapter = _saved_adapter(tmp_path, arch="gpt2", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    base, _ = pruned_model()
    with pytest.raises(AdapterMismatchError, match="no such module"):
        load_sparse_adapter(base, adapter)


def test_finetune_bad_settings():
    model, _ = pruned_model()
    with pytest.raises(ValueError, match="peft adapters only"):
        finetune(model, make_ids(), steps=1, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        finetune(lora(model), make_ids(), steps=0, progress=False)
