"""Zero/few-shot accuracy with lm-evaluation-harness (`pip install optimum-sparse[eval]`) on an in-memory model."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from unittest import mock
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from .wiki_mc import TASKS_DIR, WIKI_MC_TASK

__all__ = [
    "STANDARD_TASKS", "OFFLINE_TASKS", "LM_EVAL_REQUIREMENT", "TaskResults", "evaluate_tasks", "run_tasks",
    "resolve_tasks", "check_hub_reachable", "share_kept", "accuracy_table",
]

logger = logging.getLogger(__name__)

LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13,<0.5"
# The zero-shot set of the SparseGPT / Wanda / OWL papers.
STANDARD_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OFFLINE_TASKS = (WIKI_MC_TASK,)
_HUB_PROBE_URL = "https://huggingface.co/api/datasets/allenai/ai2_arc"
_PRIMARY_METRICS = ("acc", "acc_norm")


def _lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(
            "Accuracy evaluation needs lm-evaluation-harness: pip install 'optimum-sparse[eval]' "
            f"(or pip install '{LM_EVAL_REQUIREMENT}')."
        ) from err
    return lm_eval


def resolve_tasks(tasks: Union[str, Sequence[str]]) -> list[str]:
    """Task names from a list or a comma-separated string; `"standard"` expands to `STANDARD_TASKS`."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        for task in (STANDARD_TASKS if name == "standard" else (name,)):
            if task and task not in out:
                out.append(task)
    if not out:
        raise ValueError(f"No task given (got {tasks!r}); try {WIKI_MC_TASK!r} or 'standard'.")
    return out


def _offline_mode() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_hub_reachable(tasks: Sequence[str], timeout: float = 3.0) -> None:
    """Raises `ConnectionError` at once when `tasks` need Hub datasets and the Hub cannot be reached.

    One request with a short timeout; skipped when every task is offline, or when `HF_HUB_OFFLINE` /
    `HF_DATASETS_OFFLINE` is set (the datasets must then be in the local cache, which `datasets` checks).
    """
    remote = [t for t in tasks if t not in OFFLINE_TASKS]
    if not remote or _offline_mode():
        return
    try:
        urllib.request.urlopen(urllib.request.Request(_HUB_PROBE_URL, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the Hub answered
    except (OSError, ValueError) as err:
        raise ConnectionError(
            f"Tasks {remote} download their datasets from the Hugging Face Hub, which is not reachable ({err}). "
            f"Use the offline task {WIKI_MC_TASK!r}, or set HF_DATASETS_OFFLINE=1 if these datasets are cached."
        ) from None


@dataclass
class TaskResults:
    """What one lm-eval run measured.

    Attributes:
        metrics: `{task: {metric: value, "<metric>_stderr": stderr}}` (`acc`, `acc_norm`, ... as the task defines).
        versions: `{task: task version}`.
        samples: `{task: number of items evaluated}`.
        num_fewshot: few-shot examples per item.
        limit: the `limit` asked for (`None`: every item).
        lm_eval_version: the lm-evaluation-harness version.
        seconds: wall time of the evaluation.
    """

    metrics: dict[str, dict[str, float]]
    versions: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    num_fewshot: int = 0
    limit: Optional[float] = None
    lm_eval_version: Optional[str] = None
    seconds: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _clean_metrics(raw: dict) -> dict[str, float]:
    """`{"acc,none": x, "acc_stderr,none": s, "alias": ...}` -> `{"acc": x, "acc_stderr": s}` (numbers only)."""
    out = {}
    for key, value in raw.items():
        name, _, filt = key.partition(",")
        if not filt or isinstance(value, str) or value is None:
            continue
        name = name if filt == "none" else f"{name}[{filt}]"
        out[name] = float(value)
    return out


_EXPECTED_WARNINGS = (  # lm-eval's warnings about what we do on purpose (an in-memory model, our task's loader, 0-shot)
    "`pretrained` model kwarg is not of type", "Passed an already-initialized model", "Custom kwargs can be passed",
    "Overwriting default num_fewshot",
)


class _ExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(text in message for text in _EXPECTED_WARNINGS)


@contextlib.contextmanager
def _quiet_expected_warnings():
    loggers = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.evaluator")]
    filt = _ExpectedWarnings()
    for log in loggers:
        log.addFilter(filt)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(filt)


def _without_env_dump():
    """Skips lm-eval's environment dump (torch's collect_env runs `pip list` in a subprocess: 4-5 s per call, for
    fields we do not keep; our record and benchmarks store their own provenance)."""
    import lm_eval.evaluator as evaluator

    if not hasattr(evaluator, "add_env_info"):
        return contextlib.nullcontext()
    return mock.patch.object(evaluator, "add_env_info", lambda results: None)


def run_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Union[str, Sequence[str]] = (WIKI_MC_TASK,),
              num_fewshot: int = 0, limit: Optional[float] = None, batch_size: int = 8,
              max_length: Optional[int] = None) -> TaskResults:
    """Runs lm-eval on the in-memory `model` (no save/reload) and returns the metrics with their provenance.

    See `evaluate_tasks` for the arguments. The model is put in eval mode for the run and restored after.
    """
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}.")
    if limit is not None and not limit > 0:
        raise ValueError(f"limit must be > 0 (items, or a fraction below 1), got {limit}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    names = resolve_tasks(tasks)
    lm_eval = _lm_eval()
    check_hub_reachable(names)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    remote = any(t not in OFFLINE_TASKS for t in names)
    manager = TaskManager(include_path=TASKS_DIR, include_defaults=remote)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"Unknown lm-eval tasks {unknown}; offline: {list(OFFLINE_TASKS)}, standard: {list(STANDARD_TASKS)}.")
    was_training = model.training
    started = time.perf_counter()
    try:
        with _quiet_expected_warnings(), _without_env_dump():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=1000)
    finally:
        model.train(was_training)
    results = TaskResults(
        metrics={t: _clean_metrics(out["results"][t]) for t in names},
        versions={t: out.get("versions", {}).get(t) for t in names},
        samples={t: int(out.get("n-samples", {}).get(t, {}).get("effective", 0)) for t in names},
        num_fewshot=num_fewshot, limit=limit, lm_eval_version=getattr(lm_eval, "__version__", None),
        seconds=round(time.perf_counter() - started, 2),
    )
    for t in names:
        m = results.metrics[t]
        logger.info("%s (%d items): %s", t, results.samples[t],
                    ", ".join(f"{k} {m[k]:.4f} ± {m.get(k + '_stderr', float('nan')):.4f}" for k in _PRIMARY_METRICS if k in m))
    return results


def evaluate_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Union[str, Sequence[str]] = (WIKI_MC_TASK,),
                   num_fewshot: int = 0, limit: Optional[float] = None, batch_size: int = 8,
                   max_length: Optional[int] = None) -> dict[str, dict[str, float]]:
    """Accuracy of an in-memory causal LM on lm-evaluation-harness tasks.

    Args:
        model: the (dense or pruned) model, used as it is: no save/reload.
        tokenizer: its tokenizer.
        tasks: task names (a list or a comma-separated string). `"wiki_offline_mc"` needs no network;
            `"standard"` is the paper set `STANDARD_TASKS` (datasets from the Hub: fails at once when unreachable).
        num_fewshot: few-shot examples per item.
        limit: evaluate only the first `limit` items of each task (a float below 1: that fraction).
        batch_size: sequences per forward pass.
        max_length: longest sequence in tokens (default: the model's context length).

    Returns:
        `{task: {metric: value, "<metric>_stderr": stderr}}`, e.g.
        `{"wiki_offline_mc": {"acc": 0.81, "acc_stderr": 0.02, "acc_norm": 0.83, "acc_norm_stderr": 0.02}}`.
        `run_tasks` returns the same with task versions, item counts and the lm-eval version.

    Raises:
        ImportError: lm-eval is not installed (`pip install optimum-sparse[eval]`).
        ConnectionError: a task needs the Hub and the Hub is unreachable.
    """
    return run_tasks(model, tokenizer, tasks, num_fewshot, limit, batch_size, max_length).metrics


def share_kept(dense: Optional[float], pruned: Optional[float]) -> Optional[float]:
    """Pruned accuracy as a share of dense accuracy (`None` when either is missing or dense is 0)."""
    if dense is None or pruned is None or not dense:
        return None
    return pruned / dense


def _as_results(value: Union[TaskResults, dict, None]) -> Optional[TaskResults]:
    if value is None or isinstance(value, TaskResults):
        return value
    if not isinstance(value, dict) or not all(isinstance(m, dict) for m in value.values()):
        raise ValueError(f"Accuracy must be `run_tasks` results or `evaluate_tasks`'s {{task: {{metric: value}}}}, got {value!r}.")
    return TaskResults(metrics=value)


def accuracy_table(dense: Union[TaskResults, dict, None] = None, pruned: Union[TaskResults, dict, None] = None,
                   num_fewshot: Optional[int] = None, limit: Optional[float] = None) -> dict:
    """The accuracy table of the pruning record: per task the dense and pruned metrics, the share of dense kept
    (pruned / dense, for each metric that has both), the task version and the item count; with `num_fewshot`,
    `limit` and the lm-eval version. `dense`/`pruned` are `run_tasks` results or `evaluate_tasks` dicts (then pass
    `num_fewshot`/`limit` here, as versions and item counts are unknown)."""
    dense, pruned = _as_results(dense), _as_results(pruned)
    runs = [r for r in (dense, pruned) if r is not None]
    if not runs:
        raise ValueError("record_accuracy needs at least one of `before` (dense) and `after` (pruned).")
    shots = {r.num_fewshot for r in runs if r.lm_eval_version is not None}
    limits = {r.limit for r in runs if r.lm_eval_version is not None}
    if len(shots) > 1 or len(limits) > 1:
        raise ValueError(f"Dense and pruned accuracy were measured differently (num_fewshot {shots}, limit {limits}).")
    tasks = {}
    for task in dict.fromkeys(t for r in runs for t in r.metrics):
        d = dense.metrics.get(task) if dense else None
        p = pruned.metrics.get(task) if pruned else None
        share = {k: share_kept(d.get(k), v) for k, v in (p or {}).items()
                 if d and not k.endswith("_stderr") and share_kept(d.get(k), v) is not None}
        tasks[task] = {"dense": d, "pruned": p, "share_of_dense": share or None,
                       "version": next((r.versions.get(task) for r in runs if r.versions.get(task) is not None), None),
                       "items": next((r.samples.get(task) for r in runs if r.samples.get(task)), None)}
    return {"tasks": tasks,
            "num_fewshot": next(iter(shots)) if shots else num_fewshot,
            "limit": next(iter(limits)) if limits else limit,
            "lm_eval_version": next((r.lm_eval_version for r in runs if r.lm_eval_version), None)}
