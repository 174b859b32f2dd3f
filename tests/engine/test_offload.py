"""Models whose blocks accelerate offloads to CPU or disk prune to exactly the same weights as in-memory models."""

from __future__ import annotations

import hashlib

import pytest
import torch
from accelerate import cpu_offload, init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoConfig, AutoModelForCausalLM

from optimum_sparse import PruningConfig, SparsePruner

from ..helpers import make_ids, make_model

NUM_LAYERS = 3


def _file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", num_layers=NUM_LAYERS).save_pretrained(folder)
    return folder


def _device_map(disk_blocks) -> dict:
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i in disk_blocks else "cpu" for i in range(NUM_LAYERS)})
    return device_map


def _prune(model, method="sparsegpt", **kwargs):
    config = PruningConfig(method=method, sparsity=0.5, num_samples=4, seq_len=16, **kwargs)
    SparsePruner(config).apply(model, dataset=make_ids(), progress=False)
    return model


def _pruned_reference(checkpoint, method="sparsegpt", **kwargs):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return {k: v.clone() for k, v in _prune(model, method, **kwargs).state_dict().items()}


def _assert_same_weights(folder, reference):
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for name, value in reference.items():
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "sparsellm"])
def test_disk_offloaded_blocks_prune_like_in_memory(checkpoint, tmp_path, method):
    reference = _pruned_reference(checkpoint, method)
    original = _file_digest(checkpoint / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map=_device_map({1, 2}),
                                                 offload_folder=tmp_path / "offload")
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    _prune(model, method)
    assert model.model.layers[2].mlp.down_proj.weight.device.type == "meta"  # still offloaded afterwards
    model.save_pretrained(tmp_path / "out")
    _assert_same_weights(tmp_path / "out", reference)
    assert _file_digest(checkpoint / "model.safetensors") == original  # the source checkpoint is never written


def test_offloaded_model_forward_uses_pruned_weights(checkpoint, tmp_path):
    reference_model = _prune(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map=_device_map({0, 1, 2}),
                                                 offload_folder=tmp_path / "offload")
    _prune(model)
    ids = make_ids(2, 12, seed=3)
    torch.testing.assert_close(model(ids).logits, reference_model(ids).logits)


def test_cpu_offload_hooks_state_dict_storage(checkpoint):
    """accelerate's `cpu_offload`: the weights live in a CPU state dict behind the hooks."""
    reference = _pruned_reference(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    _prune(model)
    weights_map = model.model.layers[0].mlp.down_proj._hf_hook.weights_map.dataset  # the whole CPU state dict
    for name, value in reference.items():
        if name in weights_map:
            torch.testing.assert_close(weights_map[name], value, rtol=0, atol=0, msg=name)
    pruned = [n for n in reference if n.endswith("mlp.down_proj.weight")]
    assert pruned and all(float((weights_map[n] == 0).float().mean()) == 0.5 for n in pruned)


def test_init_empty_weights_and_load_checkpoint_and_dispatch(checkpoint, tmp_path):
    reference = _pruned_reference(checkpoint)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=torch.float32)
    model.tie_weights()
    model = load_checkpoint_and_dispatch(model, str(checkpoint), device_map=_device_map({0, 2}),
                                         offload_folder=str(tmp_path / "offload"), dtype=torch.float32)
    _prune(model)
    ids = make_ids(2, 12, seed=5)
    dense = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    dense.load_state_dict(reference)
    torch.testing.assert_close(model(ids).logits, dense(ids).logits)


def test_prune_cli_with_disk_offload_and_checkpoint(checkpoint, tmp_path):
    import json

    from optimum_sparse.cli.main import main

    from ..helpers import build_tokenizer

    source = tmp_path / "dense"
    AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    args = ["--log-level", "WARNING", "prune", "--model", str(source), "--method", "sparsegpt", "--sparsity", "0.5",
            "--num-samples", "4", "--seq-len", "16", "--dtype", "float32", "--device-map", json.dumps(_device_map({1, 2})),
            "--offload-folder", str(tmp_path / "offload"), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--output", str(tmp_path / "out")]
    assert main(args) == 0
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["next_block"] == NUM_LAYERS
    in_memory = tmp_path / "in-memory"
    assert main(args[:args.index("--device-map")] + ["--output", str(in_memory)]) == 0
    _assert_same_weights(tmp_path / "out", AutoModelForCausalLM.from_pretrained(in_memory, dtype=torch.float32).state_dict())
