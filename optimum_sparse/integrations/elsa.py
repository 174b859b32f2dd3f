"""Moved to `optimum_sparse.methods.elsa_trainer` (the lifecycle adapter of the ELSA method sits beside its solver, `methods/elsa.py`); this name stays an alias of that module."""

import sys

from ..methods import elsa_trainer as _module

sys.modules[__name__] = _module
