"""Modeling code shipped inside structurally pruned checkpoints written by optimum-sparse.

Self-contained (torch and transformers only), so that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` works without optimum-sparse installed. A pruned checkpoint whose layers ended with
different sizes keeps its stock `config.json` (`model_type`, every stock field) plus two keys:

- `pruned_modules`: `{module name: [out_features, in_features, has_bias]}` for every linear that was resized;
- `pruned_attributes`: `{module name: {attribute: value}}` (e.g. an attention's `num_heads` after head pruning);

and an `auto_map` pointing at one of the `Pruned*` classes below: the stock class, built as usual, then the listed
linears are replaced by ones of the recorded shapes before the weights are loaded.
"""

import torch.nn as nn
import transformers
from transformers.pytorch_utils import Conv1D

__all__ = ["apply_pruned_shapes", "PRUNED_CLASSES"]

# stock class name -> pruned class name
PRUNED_CLASSES = {
    "LlamaForCausalLM": "PrunedLlamaForCausalLM",
    "MistralForCausalLM": "PrunedMistralForCausalLM",
    "Qwen2ForCausalLM": "PrunedQwen2ForCausalLM",
    "Qwen3ForCausalLM": "PrunedQwen3ForCausalLM",
    "OPTForCausalLM": "PrunedOPTForCausalLM",
    "GPT2LMHeadModel": "PrunedGPT2LMHeadModel",
}


def apply_pruned_shapes(model: nn.Module, config) -> None:
    """Replaces the linears listed in `config.pruned_modules` by empty ones of the recorded shapes and sets the
    attributes of `config.pruned_attributes`."""
    for name, (out_features, in_features, has_bias) in (getattr(config, "pruned_modules", None) or {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, Conv1D):
            new = Conv1D(int(out_features), int(in_features))
        else:
            new = nn.Linear(int(in_features), int(out_features), bias=bool(has_bias))
        setattr(parent, child, new.to(device=old.weight.device, dtype=old.weight.dtype))
    for name, attributes in (getattr(config, "pruned_attributes", None) or {}).items():
        module = model.get_submodule(name)
        for key, value in attributes.items():
            setattr(module, key, value)


def _pruned_class(name: str, base: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_pruned_shapes(self, config)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "_auto_class": "AutoModelForCausalLM"})


for _stock, _pruned in PRUNED_CLASSES.items():
    if hasattr(transformers, _stock):
        globals()[_pruned] = _pruned_class(_pruned, getattr(transformers, _stock))
