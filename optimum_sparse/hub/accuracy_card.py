"""The accuracy part of the model card: the dense/pruned table and the model-index entries (lm-eval tasks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from ..report import PruningReport

__all__ = ["accuracy_fields", "accuracy_eval_results"]

# lm-eval task -> (Hub dataset id, config, split) for the model-index; the offline task has no Hub dataset.
_TASK_DATASETS = {
    "boolq": ("super_glue", "boolq", "validation"),
    "rte": ("super_glue", "rte", "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
    "wiki_offline_mc": ("wiki_offline_mc", None, "evaluation"),  # built from wiki-offline (optimum_sparse.eval.wiki_mc)
}
_METRICS = ("acc", "acc_norm")


def _value(metrics: Optional[dict], key: str) -> str:
    if not metrics or metrics.get(key) is None:
        return "n/a"
    stderr = metrics.get(f"{key}_stderr")
    return f"{metrics[key]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def accuracy_fields(record: "PruningReport") -> dict:
    """Template fields: `accuracy_rows` (one per task and metric) and `accuracy_text` (how it was measured)."""
    acc = record.accuracy or {}
    rows = []
    for task, entry in (acc.get("tasks") or {}).items():
        share = entry.get("share_of_dense") or {}
        for key in _METRICS:
            if key not in (entry.get("pruned") or {}) and key not in (entry.get("dense") or {}):
                continue
            rows.append({"task": task, "version": entry.get("version") if entry.get("version") is not None else "n/a",
                         "count": entry.get("items") or "n/a", "metric": key,
                         "dense": _value(entry.get("dense"), key), "pruned": _value(entry.get("pruned"), key),
                         "share": f"{100 * share[key]:.1f}%" if share.get(key) is not None else "n/a"})
    text = ""
    if rows:
        limit = acc.get("limit")
        text = (f"lm-evaluation-harness {acc.get('lm_eval_version') or '(version not recorded)'}, "
                f"{acc.get('num_fewshot', 0)}-shot, "
                + ("every item" if limit is None else f"limit {limit:g} per task")
                + "; ± is lm-eval's standard error")
        if "wiki_offline_mc" in acc["tasks"]:
            text += ("; `wiki_offline_mc` is optimum-sparse's offline 4-way next-sentence task on held-out Wikipedia "
                     "articles (chance 25%)")
    return {"accuracy_rows": rows, "accuracy_text": text}


def accuracy_eval_results(record: "PruningReport") -> list:
    """model-index `EvalResult`s of the pruned model's accuracy (one per task and metric)."""
    from huggingface_hub import EvalResult

    acc = record.accuracy or {}
    out = []
    for task, entry in (acc.get("tasks") or {}).items():
        pruned = entry.get("pruned") or {}
        dtype, dconfig, split = _TASK_DATASETS.get(task, (task, None, None))
        for key in _METRICS:
            if pruned.get(key) is None:
                continue
            out.append(EvalResult(
                task_type="text-generation", task_name=f"{task} ({acc.get('num_fewshot', 0)}-shot)",
                dataset_type=dtype, dataset_name=task, dataset_config=dconfig, dataset_split=split,
                metric_type=key, metric_name=f"{key} ({acc.get('num_fewshot', 0)}-shot)",
                metric_value=round(float(pruned[key]), 4), source_name="lm-evaluation-harness",
                source_url="https://github.com/EleutherAI/lm-evaluation-harness",
            ))
    return out
