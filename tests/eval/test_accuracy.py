"""Accuracy with lm-eval: the offline `wiki_offline_mc` task, `evaluate_tasks`/`run_tasks` on an in-memory tiny
model, the accuracy table, the missing-extra and Hub-unreachable errors."""

from __future__ import annotations

import socket
import sys
import time

import pytest
import torch
import transformers

from optimum_sparse.eval.accuracy import (
    STANDARD_TASKS, TaskResults, accuracy_table, check_hub_reachable, evaluate_tasks, resolve_tasks, run_tasks,
)
from optimum_sparse.eval.wiki_mc import WIKI_MC_ITEMS, build_wiki_mc_items, split_sentences, wiki_mc_dataset

from ..helpers import build_config


@pytest.fixture(scope="module")
def long_model():
    """A tiny random llama with room for whole items (the test tokenizer is close to one token per character)."""
    config = build_config("llama")
    config.max_position_embeddings = 1024
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _texts(n=12):
    return tuple(f"Article {i} opens with sentence number {i} here. "
                 f"Then it goes on with a second sentence {'x' * (i % 5)} for {i}. A third one." for i in range(n))


# ----- the items -------------------------------------------------------------------------------------------------
def test_items_structure_on_given_texts():
    texts = _texts()
    items = build_wiki_mc_items(None, texts=texts)
    assert len(items) == len(texts)
    for item in items:
        sentences = split_sentences(texts[item["article"]])
        assert item["context"] == sentences[0]
        assert item["choices"][item["label"]] == sentences[1]  # the true next sentence
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        others = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
        assert all(c not in texts[item["article"]] for c in others)  # distractors come from other articles
    assert len({item["label"] for item in items}) > 1  # answer positions are shuffled
    assert build_wiki_mc_items(5, texts=texts) == items[:5]
    assert build_wiki_mc_items(None, seed=1, texts=texts) != items
    with pytest.raises(ValueError, match="usable articles"):
        build_wiki_mc_items(None, texts=texts[:3])


def test_items_deterministic_and_disjoint_from_calibration(wiki):
    calibration, evaluation = wiki
    items = build_wiki_mc_items()
    assert len(items) == WIKI_MC_ITEMS == 400
    assert items == build_wiki_mc_items()
    calibration_sentences = {s for text in calibration for s in split_sentences(text)}
    texts = set()
    for item in items:
        assert item["choices"][item["label"]] in evaluation[item["article"]]
        assert item["context"] in evaluation[item["article"]]
        texts.update([item["context"], *item["choices"]])
    assert not texts & calibration_sentences
    counts = [sum(item["label"] == k for item in items) for k in range(4)]
    assert min(counts) > 70  # answer positions balanced: no position bias to exploit
    dataset = wiki_mc_dataset()
    assert dataset["test"].num_rows == WIKI_MC_ITEMS and dataset["train"].num_rows > 100
    assert not set(dataset["test"]["article"]) & set(dataset["train"]["article"])  # few-shot examples elsewhere


# ----- evaluate_tasks on a tiny model --------------------------------------------------------------------------------
def _loglik(model, tokenizer, context, continuation):
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_evaluate_tasks_offline(wiki, long_model, tokenizer, monkeypatch, caplog):
    def no_network(*args, **kwargs):
        raise AssertionError("the offline task must not open a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    long_model.train()
    results = run_tasks(long_model, tokenizer, "wiki_offline_mc", limit=6, batch_size=4)
    assert long_model.training  # mode restored
    assert "already-initialized" not in caplog.text and "Custom kwargs" not in caplog.text  # expected noise filtered
    metrics = results.metrics["wiki_offline_mc"]
    assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert results.samples == {"wiki_offline_mc": 6}  # limit honoured
    assert results.versions["wiki_offline_mc"] == 1.0 and results.lm_eval_version and results.limit == 6
    # lm-eval scored our items: the argmax of the summed continuation log-likelihoods, recomputed here
    items = build_wiki_mc_items(6)
    long_model.eval()
    hits = [max(range(4), key=lambda k: _loglik(long_model, tokenizer, it["context"], " " + it["choices"][k]))
            == it["label"] for it in items]
    assert metrics["acc"] == pytest.approx(sum(hits) / 6)
    assert metrics["acc_stderr"] == pytest.approx((metrics["acc"] * (1 - metrics["acc"]) / 5) ** 0.5)
    assert evaluate_tasks(long_model, tokenizer, ["wiki_offline_mc"], limit=6, batch_size=4) == results.metrics


def test_bad_arguments_fail_before_running(long_model, tokenizer):
    with pytest.raises(ValueError, match="limit"):
        evaluate_tasks(long_model, tokenizer, limit=0)
    with pytest.raises(ValueError, match="num_fewshot"):
        evaluate_tasks(long_model, tokenizer, num_fewshot=-1)
    with pytest.raises(ValueError, match="No task"):
        resolve_tasks(" , ")


# ----- errors --------------------------------------------------------------------------------------------------------
def test_missing_extra_names_it(long_model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"optimum-sparse\[eval\]"):
        evaluate_tasks(long_model, tokenizer, "wiki_offline_mc", limit=2)


def test_standard_tasks_fail_fast_when_hub_unreachable(long_model, tokenizer, hub_unreachable, monkeypatch):
    calls = hub_unreachable
    started = time.perf_counter()
    with pytest.raises(ConnectionError, match="wiki_offline_mc"):
        evaluate_tasks(long_model, tokenizer, "standard")
    assert time.perf_counter() - started < 5 and calls == [3.0]  # one probe, short timeout, no retries
    check_hub_reachable(["wiki_offline_mc"])  # offline task: no probe
    assert len(calls) == 1
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the user says the datasets are cached: no probe
    check_hub_reachable(list(STANDARD_TASKS))
    assert len(calls) == 1


def test_resolve_tasks():
    assert resolve_tasks("standard") == list(STANDARD_TASKS)
    assert resolve_tasks("wiki_offline_mc, boolq,boolq") == ["wiki_offline_mc", "boolq"]
    assert resolve_tasks(["arc_easy", "standard"])[0] == "arc_easy" and len(resolve_tasks(["arc_easy", "standard"])) == 7


# ----- the accuracy table --------------------------------------------------------------------------------------------
def _results(acc, stderr=0.02, limit=100, shots=0):
    return TaskResults(metrics={"wiki_offline_mc": {"acc": acc, "acc_stderr": stderr}}, versions={"wiki_offline_mc": 1.0},
                       samples={"wiki_offline_mc": 100}, num_fewshot=shots, limit=limit, lm_eval_version="0.4.13")


def test_accuracy_table():
    table = accuracy_table(_results(0.8), _results(0.6))
    entry = table["tasks"]["wiki_offline_mc"]
    assert entry["share_of_dense"] == {"acc": pytest.approx(0.75)}
    assert entry["version"] == 1.0 and entry["items"] == 100
    assert (table["num_fewshot"], table["limit"], table["lm_eval_version"]) == (0, 100, "0.4.13")
    only_pruned = accuracy_table(None, {"boolq": {"acc": 0.5}}, num_fewshot=5, limit=None)
    assert only_pruned["tasks"]["boolq"]["share_of_dense"] is None and only_pruned["num_fewshot"] == 5
    with pytest.raises(ValueError, match="measured differently"):
        accuracy_table(_results(0.8, limit=100), _results(0.6, limit=50))
    with pytest.raises(ValueError, match="at least one"):
        accuracy_table(None, None)
    with pytest.raises(ValueError, match="evaluate_tasks"):
        accuracy_table({"boolq": 0.5})
