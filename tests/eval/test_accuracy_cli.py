"""Accuracy in the command line: `prune --eval-tasks`, `eval --tasks --baseline`, the fail-fast errors."""

from __future__ import annotations

import json
import re
import sys

import pytest

from optimum_sparse.cli.main import main

from ..helpers import SENTENCES, build_config


def save_model_and_text(folder, tokenizer):
    """A tiny random llama saved with room for whole items (1024 positions), and a calibration text file."""
    import torch
    import transformers

    config = build_config("llama")
    config.max_position_embeddings = 1024
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")
    text = folder / "calib.txt"
    text.write_text("\n".join(SENTENCES * 20))
    return folder / "dense", text


def _rows(out: str) -> dict:
    """`| task | metric | dense | pruned | share |` rows of the printed accuracy table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] == "wiki_offline_mc":
            rows[cells[1]] = cells[2:]
    return rows


def test_prune_eval_tasks_prints_and_records_accuracy(wiki, tmp_path, tokenizer, capsys):
    dense, text = save_model_and_text(tmp_path, tokenizer)
    code = main(["prune", "--model", str(dense), "--method", "magnitude", "--sparsity", "0.9", "--dataset", str(text),
                 "--eval-tasks", "wiki_offline_mc", "--limit", "4", "--eval-batch-size", "4",
                 "--output", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {"acc", "acc_norm"}
    dense_acc, pruned_acc, share = rows["acc"]
    d, p = float(dense_acc.split(" ± ")[0]), float(pruned_acc.split(" ± ")[0])
    assert share == ("-" if d == 0 else f"{p / d:.1%}")
    assert "limit 4" in out
    record = json.loads((tmp_path / "out" / "pruning_report.json").read_text())["accuracy"]
    assert record["tasks"]["wiki_offline_mc"]["items"] == 4 and record["limit"] == 4
    assert record["tasks"]["wiki_offline_mc"]["dense"]["acc"] == pytest.approx(d, abs=5e-5)
    card = (tmp_path / "out" / "README.md").read_text()
    assert re.search(r"\| `wiki_offline_mc` \| 1\.0 \| 4 \| acc \|", card)


def test_eval_with_baseline(wiki, tmp_path, tokenizer, capsys):
    dense, _ = save_model_and_text(tmp_path, tokenizer)
    code = main(["eval", "--model", str(dense), "--baseline", str(dense), "--tasks", "wiki_offline_mc", "--limit", "3",
                 "--no-perplexity"])
    assert code == 0
    out = capsys.readouterr().out
    assert "perplexity" not in out
    dense_acc, pruned_acc, share = _rows(out)["acc"]
    assert dense_acc == pruned_acc  # the same model twice
    assert share in ("100.0%", "-")


def test_eval_fails_fast_offline_and_without_the_extra(tmp_path, hub_unreachable, monkeypatch, caplog):
    calls = hub_unreachable
    missing = str(tmp_path / "no-model")  # never loaded: the check comes first
    assert main(["eval", "--model", missing, "--tasks", "standard"]) == 2
    assert "not reachable" in caplog.text and calls == [3.0]
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert main(["eval", "--model", missing, "--tasks", "wiki_offline_mc"]) == 2
    assert "optimum-sparse[eval]" in caplog.text
