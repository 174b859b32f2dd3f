from .accuracy import (
    OFFLINE_TASKS, STANDARD_TASKS, TaskResults, accuracy_table, check_hub_reachable, evaluate_tasks, resolve_tasks,
    run_tasks,
)
from .perplexity import evaluate_perplexity, perplexity_from_ids
from .wiki_mc import WIKI_MC_CHANCE, WIKI_MC_TASK, build_wiki_mc_items

__all__ = [
    "evaluate_perplexity", "perplexity_from_ids", "evaluate_tasks", "run_tasks", "TaskResults", "accuracy_table",
    "resolve_tasks", "check_hub_reachable", "STANDARD_TASKS", "OFFLINE_TASKS", "WIKI_MC_TASK", "WIKI_MC_CHANCE",
    "build_wiki_mc_items",
]
