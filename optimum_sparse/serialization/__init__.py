"""Saving and reloading pruned models: the pruning record, the sparsity sidecar, atomic folder writes.

A pruned model is saved as a plain dense transformers checkpoint (safetensors + `config.json`, loadable by
`AutoModelForCausalLM.from_pretrained` and by vLLM as a dense model) plus files of our own:

* `pruning_config.json`: the `PruningConfig` of the run;
* `sparsity_config.json`: sparsity metadata under compressed-tensors' key names (`format`, `sparsity_structure`,
  `global_sparsity`, `targets`, `ignore`), parsable by `compressed_tensors.SparsityCompressionConfig`, plus
  per-layer sparsity. It is a sidecar on purpose: a `sparsity_config` under `quantization_config` in
  `config.json` makes recent vLLM refuse the model (vllm-project/vllm issue #51188);
* `pruning_report.json`: the pruning record (method, structure, calibration, per-layer sparsity and
  reconstruction errors, before/after perplexity);
* `README.md` and `sparsity_plot.png`: the model card (see `optimum_sparse.hub.card`).

Every save writes into a temporary sibling folder and swaps it into place only once complete, so a crash, a
full disk or a killed process never leaves a half-written model where a good one was.
"""

from .atomic import atomic_directory
from .io import (
    PrunedSavePretrained, attach_pruning_record, attached_tokenizer, check_pruned_folder, detach_pruning_record,
    load_pruning_record, load_sparsity_config, register_card_writer, save_pruned_model,
)
from .record import (
    CARD_NAME, PLOT_NAME, RECORD_NAME, SPARSITY_CONFIG_NAME, NotAPrunedModelError, PruningRecord, PruningReport, build_sparsity_config,
    checkpoint_sparsity, describe_calibration,
)

__all__ = [
    "SPARSITY_CONFIG_NAME", "RECORD_NAME", "PLOT_NAME", "CARD_NAME", "PruningRecord", "PruningReport", "NotAPrunedModelError",
    "describe_calibration", "build_sparsity_config", "checkpoint_sparsity", "atomic_directory", "save_pruned_model",
    "load_pruning_record", "load_sparsity_config", "check_pruned_folder", "attach_pruning_record", "register_card_writer",
    "detach_pruning_record", "attached_tokenizer", "PrunedSavePretrained",
]
