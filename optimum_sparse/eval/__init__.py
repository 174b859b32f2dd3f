from .perplexity import evaluate_perplexity, perplexity_from_ids

__all__ = ["evaluate_perplexity", "perplexity_from_ids"]
