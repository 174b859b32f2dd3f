"""Moved to `optimum_sparse.methods.structured_scoring` (the structured solvers' tensor math lives with the methods, which sit below the structured engine); this name stays an alias of that module."""

import sys

from ..methods import structured_scoring as _module

sys.modules[__name__] = _module
