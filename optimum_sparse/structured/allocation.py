"""The structured allocation rules; they live in `optimum_sparse.allocation.structured` (re-exported here)."""

from ..allocation.structured import *  # noqa: F401,F403
from ..allocation.structured import __all__  # noqa: F401
