"""Saving and reloading pruned models: files, equality, the compressed-tensors sidecar, masks, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optimum_sparse import OutputPathError, PruningConfig, SparsePruner
from optimum_sparse.serialization import (
    NotAPrunedModelError, atomic_directory, build_sparsity_config, load_pruning_record, load_sparsity_config,
)

from .helpers import build_tokenizer, make_ids, make_model

FILES = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "pruning_config.json", "sparsity_config.json", "pruning_report.json", "README.md", "sparsity_plot.png",
}


def prune(method="sparsegpt", structure="unstructured", sparsity=0.5, arch="llama"):
    model, tokenizer = make_model(arch), build_tokenizer()
    pruner = SparsePruner(PruningConfig(method=method, sparsity=sparsity, structure=structure, num_samples=8,
                                        seq_len=16))
    pruner.apply(model, tokenizer=tokenizer, dataset=make_ids(), progress=False)
    return model, pruner, tokenizer


@pytest.fixture(scope="module")
def pruned():
    model, pruner, tokenizer = prune()
    pruner.record_perplexity(before=50.0, after=55.5, dataset="wiki-offline", seq_len=16, windows=3)
    return model, pruner, tokenizer


@pytest.fixture(scope="module")
def saved(pruned, tmp_path_factory):
    model, pruner, tokenizer = pruned
    folder = tmp_path_factory.mktemp("ser") / "pruned"
    assert pruner.save_pretrained(model, folder, tokenizer=tokenizer) == str(folder)
    return folder


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def digest(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_save_reload_equal(pruned, saved):
    """Every weight, the config, the record and the masks come back identical; config.json stays a plain one."""
    from transformers import AutoModelForCausalLM

    model, pruner, _ = pruned
    assert FILES == set(os.listdir(saved))
    loaded = AutoModelForCausalLM.from_pretrained(saved)  # no trust_remote_code
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert PruningConfig.from_pretrained(saved) == pruner.config
    record = load_pruning_record(saved)
    assert record.to_dict() == pruner.record.to_dict() == read_json(saved / "pruning_report.json")
    assert record.perplexity == {"dense": 50.0, "pruned": 55.5, "dataset": "wiki-offline", "seq_len": 16, "windows": 3}
    assert record.calibration == {"source": "pre-tokenized input_ids tensor [8, 16]", "seed": 0, "num_samples": 8,
                                  "seq_len": 16}
    assert all(layer.relative_error is not None for layer in record.layers)
    modules = dict(model.named_modules())
    assert set(record.masks) == {layer.name for layer in record.layers} and len(record.masks) == 14
    for name, mask in record.masks.items():
        assert torch.equal(mask, modules[name].weight == 0)
        assert float(mask.float().mean()) == pytest.approx(0.5)
    config = read_json(saved / "config.json")
    assert "quantization_config" not in config and "sparsity_config" not in config
    sidecar = load_sparsity_config(saved)
    assert sidecar["layers"] == record.layer_sparsity() and sidecar["sparsity_structure"] == "unstructured"


def test_model_save_pretrained_writes_the_record(pruned, saved, tmp_path):
    """After `apply`, the model's own `save_pretrained` writes the same folder (record, sidecar, card, tokenizer)."""
    model, _, _ = pruned
    model.save_pretrained(tmp_path / "own")
    assert set(os.listdir(tmp_path / "own")) == FILES
    for name in ("model.safetensors", "sparsity_config.json", "pruning_report.json", "pruning_config.json"):
        assert (tmp_path / "own" / name).read_bytes() == (saved / name).read_bytes(), name


def test_sidecar_parses_with_compressed_tensors(saved):
    """`sparsity_config.json` uses compressed-tensors key names and parses with its `SparsityCompressionConfig`."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors import SparsityCompressionConfig
    from compressed_tensors.config import SparsityStructure

    sidecar = read_json(saved / "sparsity_config.json")
    parsed = SparsityCompressionConfig.load_from_registry(sidecar["format"], **sidecar)
    assert type(parsed).__name__ == "DenseSparsityConfig" and parsed.format == "dense"
    assert parsed.targets == ["Linear"] and parsed.ignore == ["lm_head"]
    assert SparsityStructure(parsed.sparsity_structure) is SparsityStructure.UNSTRUCTURED
    # global sparsity over all parameters (embeddings and lm_head are dense), per-layer extras beside
    assert 0.2 < parsed.global_sparsity < 0.5 and sidecar["pruned_sparsity"] == pytest.approx(0.5)
    assert len(sidecar["layers"]) == 14 and sidecar["method"] == "sparsegpt" and ct.__version__


def test_sidecar_semi_structured_and_module_names(tmp_path):
    """2:4 maps to compressed-tensors' `2:4` structure; partial pruning lists module names as targets."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors import SparsityCompressionConfig
    from compressed_tensors.config import SparsityStructure

    model, pruner, _ = prune(method="magnitude", structure="2:4")
    sidecar = build_sparsity_config(pruner.record, model)
    assert SparsityStructure(SparsityCompressionConfig.load_from_registry("dense", **sidecar).sparsity_structure) \
        is SparsityStructure.TWO_FOUR
    model = make_model("llama")
    pruner = SparsePruner(PruningConfig(method="magnitude", sparsity=0.5, targets=["re:.*mlp.*"]))
    pruner.apply(model, progress=False)
    sidecar = build_sparsity_config(pruner.record, model)
    assert sidecar["targets"] == sorted(r.name for r in pruner.record.layers) and sidecar["ignore"] == []
    assert SparsityCompressionConfig.load_from_registry("dense", **sidecar).targets == sidecar["targets"]


def test_sharded_save_recovers_masks(pruned, tmp_path):
    model, pruner, _ = pruned
    pruner.save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB", model_card=False)
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    record = load_pruning_record(tmp_path / "sharded")
    assert len(record.masks) == 14 and all(float(m.float().mean()) == pytest.approx(0.5) for m in record.masks.values())


def test_load_errors_and_modified_weights(pruned, saved, tmp_path):
    with pytest.raises(NotAPrunedModelError, match="pruning_report.json"):
        load_pruning_record(tmp_path)
    model, pruner, _ = pruned
    folder = tmp_path / "edited"
    pruner.save_pretrained(model, folder, model_card=False)
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] = torch.ones_like(weights["model.layers.0.mlp.down_proj.weight"])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="down_proj.*fewer than the recorded"):
        load_pruning_record(folder)


def test_save_before_apply_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="apply"):
        SparsePruner(PruningConfig(method="magnitude")).save_pretrained(make_model("llama"), tmp_path / "x")


# ----- atomic writes ------------------------------------------------------------------------------------------------
def test_crash_mid_write_keeps_the_previous_folder(pruned, tmp_path, monkeypatch):
    """A failure after the weights were written (here: in the card) leaves the previous save exactly as it was."""
    import optimum_sparse.serialization.io as io

    model, pruner, tokenizer = pruned
    folder = tmp_path / "model"
    pruner.save_pretrained(model, folder, tokenizer=tokenizer)
    before = digest(folder)

    def crash(tmp, *args, **kwargs):
        assert os.path.isfile(os.path.join(tmp, "model.safetensors"))  # mid-write: weights already there
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_CARD_WRITER", crash)  # the card writer hub registered with the save path
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)  # the new save would differ
    try:
        with pytest.raises(OSError, match="No space left"):
            pruner.save_pretrained(model, folder, tokenizer=tokenizer, overwrite=True)
    finally:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.div_(2)
    assert digest(folder) == before
    assert os.listdir(tmp_path) == ["model"]  # the temporary folder is gone too


def test_killed_process_mid_write(pruned, tmp_path):
    """A process killed while saving leaves the old folder intact; the next save cleans up after it."""
    folder = tmp_path / "model"
    with atomic_directory(folder) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write('{"good": true}')
    script = textwrap.dedent(f"""
        import os
        from optimum_sparse.serialization import atomic_directory
        with atomic_directory({str(folder)!r}) as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write("half-writ")
            os._exit(9)  # killed mid-write: no cleanup runs
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    assert subprocess.run([sys.executable, "-c", script], env=env, timeout=120).returncode == 9
    assert (folder / "config.json").read_text() == '{"good": true}'
    leftovers = [e for e in os.listdir(tmp_path) if e.startswith(".model.tmp-")]
    assert len(leftovers) == 1
    model, pruner, _ = pruned
    pruner.save_pretrained(model, folder, model_card=False, overwrite=True)
    assert os.listdir(tmp_path) == ["model"] and (folder / "model.safetensors").is_file()


def test_interrupted_swap_is_repaired(tmp_path):
    """If the old folder was moved aside and the process died before the new one took its place, it is restored."""
    aside = tmp_path / ".model.old-999999999-abcd1234"  # a pid that cannot exist
    aside.mkdir()
    (aside / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "model"):
            assert (tmp_path / "model" / "config.json").read_text() == "old"  # restored before anything else
            raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_swap_without_renameat2(pruned, tmp_path, monkeypatch):
    """Where an atomic exchange is unavailable, the old folder is renamed aside, then removed after the swap."""
    import optimum_sparse.atomic as atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    model, pruner, _ = pruned
    for _ in range(2):
        pruner.save_pretrained(model, tmp_path / "model", model_card=False, overwrite=True)
    assert os.listdir(tmp_path) == ["model"] and load_pruning_record(tmp_path / "model").masks


def test_replacing_keeps_user_files_drops_stale_shards(pruned, tmp_path):
    model, pruner, _ = pruned
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (folder / "README.md").write_text("old card")
    with pytest.raises(OutputPathError, match="already holds a model.*overwrite=True"):
        pruner.save_pretrained(model, folder)  # stale shard = another model: refused, nothing touched
    assert (folder / "model-00002-of-00002.safetensors").read_bytes() == b"stale"
    pruner.save_pretrained(model, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / ".git" / "HEAD").is_file()
    assert not (folder / "model-00002-of-00002.safetensors").exists()
    assert (folder / "README.md").read_text() != "old card"


def test_save_refuses_a_file_or_an_existing_model(pruned, tmp_path):
    model, pruner, _ = pruned
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        pruner.save_pretrained(model, tmp_path / "file")
    with pytest.raises(OutputPathError, match="is a file"):
        pruner.save_pretrained(model, tmp_path / "file" / "sub")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(OutputPathError, match="already holds a model"):
        model.save_pretrained(other)  # the model's own save_pretrained too
    assert os.listdir(other) == ["config.json"]
    model.save_pretrained(other, overwrite=True)
    assert (other / "model.safetensors").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_save_refuses_a_read_only_parent(pruned, tmp_path):
    model, pruner, _ = pruned
    tmp_path.joinpath("ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        with pytest.raises(OutputPathError, match="Cannot write"):
            pruner.save_pretrained(model, tmp_path / "ro" / "out")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_refuses_to_replace_the_current_directory(pruned, tmp_path, monkeypatch):
    model, pruner, _ = pruned
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="current directory"):
        pruner.save_pretrained(model, ".")
    assert os.listdir(tmp_path) == ["file.txt"]
