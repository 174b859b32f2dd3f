"""Accuracy in the record (`pruning_report.json`) and the model card: the dense/pruned table and the model-index."""

from __future__ import annotations

import copy
import json
import os

import pytest

from optimum_sparse.eval.accuracy import TaskResults
from optimum_sparse.hub.card import build_model_card


def _run(acc, acc_norm, stderr):
    return TaskResults(
        metrics={"wiki_offline_mc": {"acc": acc, "acc_stderr": stderr, "acc_norm": acc_norm, "acc_norm_stderr": stderr},
                 "boolq": {"acc": acc / 2, "acc_stderr": stderr}},
        versions={"wiki_offline_mc": 1.0, "boolq": 2.0}, samples={"wiki_offline_mc": 100, "boolq": 100},
        num_fewshot=0, limit=100, lm_eval_version="0.4.13")


@pytest.fixture
def with_accuracy(pruned):
    model, pruner, tokenizer = pruned
    pruner = copy.deepcopy(pruner)  # the session fixture stays as other tests expect it
    pruner.record_accuracy(before=_run(0.8, 0.75, 0.04), after=_run(0.6, 0.6, 0.049))
    return model, pruner, tokenizer


def test_card_renders_accuracy_table(with_accuracy):
    _, pruner, _ = with_accuracy
    card = build_model_card(pruner.record)
    text = card.text
    assert "Accuracy (lm-evaluation-harness 0.4.13, 0-shot, limit 100 per task" in text
    assert "| `wiki_offline_mc` | 1.0 | 100 | acc | 0.8000 ± 0.0400 | 0.6000 ± 0.0490 | 75.0% |" in text
    assert "| `wiki_offline_mc` | 1.0 | 100 | acc_norm | 0.7500 ± 0.0400 | 0.6000 ± 0.0490 | 80.0% |" in text
    assert "| `boolq` | 2.0 | 100 | acc | 0.4000 ± 0.0400 | 0.3000 ± 0.0490 | 75.0% |" in text
    assert "chance 25%" in text
    assert "| Pruned (this model) | 130.250 |" in text  # perplexity still there
    results = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}  # parsed back from model-index
    assert results[("wiki_offline_mc", "acc")].metric_value == 0.6
    assert results[("wiki_offline_mc", "acc_norm")].metric_value == 0.6
    assert results[("boolq", "acc")].dataset_type == "super_glue" and results[("boolq", "acc")].dataset_config == "boolq"
    assert any(r.metric_type == "perplexity" for r in card.data.eval_results)


def test_card_without_accuracy_has_no_table(pruned):
    _, pruner, _ = pruned
    assert pruner.record.accuracy is None
    card = build_model_card(pruner.record)
    assert "Share of dense kept" not in card.text and len(card.data.eval_results) == 1


def test_record_round_trip(with_accuracy, tmp_path):
    from optimum_sparse.serialization import load_pruning_record

    model, pruner, tokenizer = with_accuracy
    folder = pruner.save_pretrained(copy.deepcopy(model), str(tmp_path / "out"), tokenizer=tokenizer)
    with open(os.path.join(folder, "pruning_report.json"), encoding="utf-8") as f:
        saved = json.load(f)["accuracy"]
    entry = saved["tasks"]["wiki_offline_mc"]
    assert entry["dense"]["acc"] == 0.8 and entry["pruned"]["acc"] == 0.6
    assert entry["share_of_dense"]["acc"] == pytest.approx(0.75) and entry["version"] == 1.0
    assert (saved["num_fewshot"], saved["limit"], saved["lm_eval_version"]) == (0, 100, "0.4.13")
    assert load_pruning_record(folder).accuracy == saved
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
        assert "| acc | 0.8000 ± 0.0400 | 0.6000 ± 0.0490 | 75.0% |" in f.read()


def test_record_accuracy_from_evaluate_tasks_dicts(pruned):
    _, pruner, _ = pruned
    pruner = copy.deepcopy(pruner)
    pruner.record_accuracy(after={"arc_easy": {"acc": 0.5, "acc_stderr": 0.05}}, num_fewshot=5, limit=None)
    table = pruner.record.accuracy
    assert table["tasks"]["arc_easy"]["dense"] is None and table["num_fewshot"] == 5
    assert "| `arc_easy` | n/a | n/a | acc | n/a | 0.5000 ± 0.0500 | n/a |" in build_model_card(pruner.record).text
    with pytest.raises(ValueError):
        pruner.record_accuracy()
