"""Pruning methods: each file is tensor math registered under a name."""

from .base import LinearStats, PruningMethod, available_methods, get_method_class, register_method
from . import alps, elsa, magnitude, sparsegpt, sparsellm, wanda  # noqa: F401  (registration)
from . import expert_removal, flap, structprune, wanda_structured  # noqa: F401  (structured methods)

__all__ = ["LinearStats", "PruningMethod", "available_methods", "get_method_class", "register_method"]
