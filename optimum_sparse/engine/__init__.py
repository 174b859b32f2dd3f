from .architectures import ARCHITECTURES, ArchitectureSpec, MLPSpec, UnsupportedModelError, find_blocks, get_architecture
from ..report import LayerReport
from .block import BlockJob
from .checkpoint import CheckpointMismatchError, RunCheckpoint
from .sequential import PruningReport, check_targets, run_sequential

__all__ = [
    "ARCHITECTURES", "ArchitectureSpec", "MLPSpec", "UnsupportedModelError", "find_blocks", "get_architecture",
    "BlockJob", "LayerReport", "PruningReport", "check_targets", "run_sequential", "RunCheckpoint",
    "CheckpointMismatchError",
]
