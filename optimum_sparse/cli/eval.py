"""Accuracy (lm-eval) in the command line: flags and the dense-vs-pruned table of `eval`, `prune` and `demo`."""

from __future__ import annotations

import argparse
import logging
from typing import Optional

logger = logging.getLogger("optimum_sparse.cli")

__all__ = [
    "add_accuracy_args", "add_eval_command_args", "measure", "precheck", "run_eval_accuracy", "format_accuracy_table",
    "accuracy_cell",
]


def add_accuracy_args(parser: argparse.ArgumentParser, tasks_flag: str = "--tasks") -> None:
    """`--tasks`/`--eval-tasks`, `--num-fewshot`, `--limit`, `--eval-batch-size`."""
    parser.add_argument(tasks_flag, dest="tasks", default=None, metavar="TASKS",
                        help="lm-eval tasks, comma-separated: 'wiki_offline_mc' (offline, bundled held-out Wikipedia), "
                             "'standard' (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; "
                             "needs the Hub) or any lm-eval task name. Needs `pip install optimum-sparse[eval]`.")
    parser.add_argument("--num-fewshot", type=int, default=0, help="Few-shot examples per item (accuracy).")
    parser.add_argument("--limit", type=float, default=None, help="Items per task (accuracy; default: all).")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="Sequences per forward pass (accuracy).")


def measure(model, tokenizer, args):
    """`run_tasks` with the command's accuracy flags, or None when no task was asked for."""
    if not getattr(args, "tasks", None):
        return None
    from ..eval.accuracy import run_tasks

    return run_tasks(model, tokenizer, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                     batch_size=args.eval_batch_size)


def accuracy_cell(metrics: Optional[dict], key: str = "acc") -> str:
    """`0.7125 ± 0.0226` (or `-`)."""
    if not metrics or metrics.get(key) is None:
        return "-"
    stderr = metrics.get(f"{key}_stderr")
    return f"{metrics[key]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def format_accuracy_table(dense=None, pruned=None) -> str:
    """Markdown table of `run_tasks` results, one row per task and metric: dense, pruned and the share of dense kept
    when both are given, else the one model's accuracy."""
    from ..eval.accuracy import accuracy_table

    table = accuracy_table(dense, pruned)
    both = dense is not None and pruned is not None
    lines = (["| task | metric | dense | pruned | share of dense kept |", "|---|---|---|---|---|"] if both
             else ["| task | metric | accuracy |", "|---|---|---|"])
    for task, entry in table["tasks"].items():
        for key in [k for k in (entry["pruned"] or entry["dense"] or {}) if not k.endswith("_stderr")]:
            if not both:
                lines.append(f"| {task} | {key} | {accuracy_cell(entry['pruned'] or entry['dense'], key)} |")
                continue
            share = (entry["share_of_dense"] or {}).get(key)
            lines.append(f"| {task} | {key} | {accuracy_cell(entry['dense'], key)} | {accuracy_cell(entry['pruned'], key)} "
                         f"| {'-' if share is None else f'{share:.1%}'} |")
    limit = table["limit"]
    lines.append(f"\nlm-eval {table['lm_eval_version']}, {table['num_fewshot']}-shot, "
                 + ("all items" if limit is None else f"limit {limit:g}") + "; ± is the standard error.")
    return "\n".join(lines)


def precheck(args) -> None:
    """Fails before any model load when accuracy is asked for and cannot run (lm-eval missing, Hub unreachable)."""
    if not getattr(args, "tasks", None):
        return
    from ..eval.accuracy import _lm_eval, check_hub_reachable, resolve_tasks

    _lm_eval()
    check_hub_reachable(resolve_tasks(args.tasks))


def add_eval_command_args(parser: argparse.ArgumentParser) -> None:
    """`eval`'s accuracy flags: the tasks, a dense `--baseline` to compare with, and `--no-perplexity`."""
    add_accuracy_args(parser)
    parser.add_argument("--baseline", default=None, metavar="MODEL",
                        help="With --tasks: also evaluate this (dense) model and print the share of its accuracy kept.")
    parser.add_argument("--no-perplexity", action="store_true", help="Skip perplexity (accuracy only).")


def run_eval_accuracy(args, model, tokenizer, load) -> None:
    """Accuracy part of `optimum-sparse eval`: the model's, and with `--baseline` the dense model's beside it."""
    if not args.tasks:
        return
    dense = None
    if args.baseline:
        base_model, base_tokenizer = load(args.baseline)
        dense = measure(base_model, base_tokenizer, args)
        del base_model
    pruned = measure(model, tokenizer, args)
    print(format_accuracy_table(dense, pruned))


def demo_accuracy(items: int):
    """The demo's accuracy column: a function `(model, tokenizer) -> "0.7100 ± 0.0456"` on the first `items` items of
    wiki_offline_mc, or None (logged) when `items` is 0 or lm-eval is not installed."""
    if items <= 0:
        logger.warning("Accuracy not measured (--eval-items 0).")
        return None
    from ..eval.accuracy import WIKI_MC_TASK, _lm_eval, run_tasks

    try:
        _lm_eval()
    except ImportError as err:
        logger.warning("Accuracy not measured: %s", err)
        return None
    return lambda model, tokenizer: accuracy_cell(
        run_tasks(model, tokenizer, WIKI_MC_TASK, limit=items, batch_size=16).metrics[WIKI_MC_TASK])
