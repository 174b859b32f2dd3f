"""Dataset loader of the `wiki_offline_mc` lm-eval task (resolved by the task YAML's `!function`)."""

from optimum_sparse.eval.wiki_mc import wiki_mc_dataset


def load_wiki_offline_mc(**kwargs):
    """`test`: the task's items; `train`: the remaining items (few-shot examples, disjoint from `test`)."""
    return wiki_mc_dataset()
