"""`optimum-sparse prune --method alps|elsa`: a tiny local model and text file in, an exactly sparse folder out."""

from __future__ import annotations

import json

import pytest

from optimum_sparse.cli.main import main
from optimum_sparse.methods.masks import num_pruned
from optimum_sparse.serialization import load_pruning_record

from ..helpers import SENTENCES, build_tokenizer, make_model


@pytest.mark.parametrize("method, kwargs", [
    ("alps", {"warm_start": "sparsegpt"}),
    ("elsa", {"steps": 6, "interval": 2, "learning_rate": 1e-3, "gradient_checkpointing": False}),
])
def test_prune_cli(tmp_path, method, kwargs):
    source = tmp_path / "dense"
    make_model("llama").save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(SENTENCES * 30))
    out = tmp_path / "out"
    code = main(["--log-level", "WARNING", "prune", "--model", str(source), "--method", method, "--sparsity", "0.7",
                 "--dataset", str(text), "--num-samples", "8", "--seq-len", "16", "--batch-size", "4",
                 "--method-kwargs", json.dumps(kwargs), "--output", str(out)])
    assert code == 0
    record = load_pruning_record(out, load_masks=True)
    assert record.method == method and record.config.method_kwargs == kwargs
    for name, mask in record.masks.items():
        assert int(mask.sum()) == num_pruned(mask.numel(), 0.7), name
    if method == "elsa":
        assert len(record.diagnostics["elsa"]["history"]) == 6
