"""`optimum.sparse`: the import path of optimum-sparse inside the Optimum namespace (the same objects as
`optimum_sparse`)."""

from optimum_sparse import *  # noqa: F401,F403
from optimum_sparse import __all__, __version__  # noqa: F401
