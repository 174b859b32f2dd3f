"""Pruning methods: each file is tensor math registered under a name; methods with a block lifecycle of their own
(hooks, activation capture, warm starts) keep it in a `<method>_lifecycle.py` adapter beside the solver file."""

from .base import LinearStats, Method, PruningMethod, available_methods, get_method_class, register_method
from . import alps_lifecycle, elsa, magnitude, sparsegpt, sparsellm_lifecycle, wanda  # noqa: F401  (registration)
from . import expert_channels, expert_removal, flap, structprune, wanda_structured  # noqa: F401  (structured methods)

from ..options import NoOptions, Options  # noqa: E402
from .alps_lifecycle import ALPSOptions  # noqa: E402
from .elsa import ELSAOptions  # noqa: E402
from .sparsellm_lifecycle import SparseLLMOptions  # noqa: E402
from .structprune import StructPruneOptions  # noqa: E402
from .structured_base import StructuredOptions  # noqa: E402

__all__ = ["LinearStats", "Method", "PruningMethod", "available_methods", "get_method_class", "register_method", "Options",
           "NoOptions", "ALPSOptions", "ELSAOptions", "SparseLLMOptions", "StructuredOptions", "StructPruneOptions"]
