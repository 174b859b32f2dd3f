"""Moved to `optimum_sparse.methods.structured_base` (the structured method interface lives with the method interface, below the structured engine); this name stays an alias of that module."""

import sys

from ..methods import structured_base as _module

sys.modules[__name__] = _module
