"""Integrations with other libraries: peft (LoRA fine-tuning that keeps the sparsity)."""

from .finetune import FinetuneResult, finetune, training_windows
from .masks import NotPrunedError, SparsityMask, detect_structure, parse_pruning_record, recover_masks
from .peft import (
    AdapterMismatchError,
    MaskedLoraVariant,
    check_adapter_compatible,
    is_masked,
    load_sparse_adapter,
    mask_lora_updates,
    merge_and_unload_sparse,
    unmask_lora_updates,
)

__all__ = [
    "mask_lora_updates", "merge_and_unload_sparse", "unmask_lora_updates", "load_sparse_adapter",
    "check_adapter_compatible", "is_masked", "MaskedLoraVariant", "AdapterMismatchError", "NotPrunedError",
    "SparsityMask", "recover_masks", "detect_structure", "parse_pruning_record", "finetune", "FinetuneResult",
    "training_windows",
]
