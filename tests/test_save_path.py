"""The save path is explicit (issue 20): `SparsePruner.save_pretrained` / `save_pruned_model` write everything;
`model.save_pretrained` writes the record only through the documented `PrunedSavePretrained` that `apply` installs
(`attach=False`: the model is left alone), which holds the record and tokenizer as plain attributes."""

import os

import transformers

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.serialization import (
    PrunedSavePretrained, RECORD_NAME, detach_pruning_record, load_pruning_record, save_pruned_model,
)

from .helpers import build_tokenizer, make_ids, make_model


def _prune(attach=True):
    model, tokenizer = make_model("llama"), build_tokenizer()
    pruner = SparsePruner(PruningConfig(method="magnitude", sparsity=0.5, num_samples=8, seq_len=16))
    pruner.apply(model, tokenizer=tokenizer, dataset=make_ids(), progress=False, attach=attach)
    return model, pruner, tokenizer


def test_apply_installs_one_documented_save_pretrained(tmp_path):
    model, pruner, tokenizer = _prune()
    saver = model.__dict__["save_pretrained"]
    assert isinstance(saver, PrunedSavePretrained) and model.save_pretrained is saver
    assert saver.record is pruner.record is model.pruning_record and saver.tokenizer is tokenizer
    assert not [k for k in model.__dict__ if k.startswith("_optimum_sparse")]  # nothing hidden on the model
    model.save_pretrained(tmp_path / "out")
    assert {RECORD_NAME, "tokenizer.json", "README.md"} <= set(os.listdir(tmp_path / "out"))
    assert load_pruning_record(tmp_path / "out").config == pruner.config
    pruner.apply(model, tokenizer=tokenizer, dataset=make_ids(), progress=False)  # a second run: the same wrapper
    assert model.__dict__["save_pretrained"] is saver and saver.record is pruner.record


def test_attach_false_leaves_the_model_alone_and_the_explicit_path_saves(tmp_path):
    model, pruner, tokenizer = _prune(attach=False)
    assert "save_pretrained" not in model.__dict__ and not hasattr(model, "pruning_record")
    model.save_pretrained(tmp_path / "plain")  # transformers' own: no record
    assert RECORD_NAME not in os.listdir(tmp_path / "plain")
    pruner.save_pretrained(model, tmp_path / "explicit")  # the tokenizer of apply is the default
    assert {RECORD_NAME, "tokenizer.json", "sparsity_config.json"} <= set(os.listdir(tmp_path / "explicit"))
    save_pruned_model(model, tmp_path / "function", pruner.record, tokenizer=None, model_card=False)
    assert RECORD_NAME in os.listdir(tmp_path / "function") and "tokenizer.json" not in os.listdir(tmp_path / "function")


def test_detach_restores_transformers_save_pretrained(tmp_path):
    model, pruner, _ = _prune()
    detach_pruning_record(model)
    assert "save_pretrained" not in model.__dict__
    assert model.save_pretrained.__func__ is transformers.PreTrainedModel.save_pretrained
    model.save_pretrained(tmp_path)
    assert RECORD_NAME not in os.listdir(tmp_path) and model.pruning_record is pruner.record


def test_one_file_level_atomic_write(tmp_path):
    """`utils.atomic_write` (also behind the resumable run's safetensors files): a failed write leaves the old file
    and no temporary file behind."""
    import pytest
    import torch
    from safetensors.torch import load_file

    from optimum_sparse.engine.checkpoint import _atomic_save
    from optimum_sparse.utils import atomic_write, atomic_write_text

    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]
    _atomic_save({"w": torch.ones(2)}, str(tmp_path / "block.safetensors"))
    assert load_file(tmp_path / "block.safetensors")["w"].tolist() == [1.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == ["block.safetensors", "state.json"]
