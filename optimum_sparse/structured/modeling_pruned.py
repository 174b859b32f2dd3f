"""Modeling code shipped inside structurally pruned checkpoints written by optimum-sparse.

Self-contained (torch and transformers only), so that `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` works without optimum-sparse installed. A pruned checkpoint whose layers ended with
different sizes keeps its stock `config.json` (`model_type`, every stock field) plus two keys:

- `pruned_modules`: `{module name: [out_features, in_features, has_bias]}` for every linear that was resized;
- `pruned_attributes`: `{module name: {attribute: value}}` (e.g. an attention's `num_heads` after head pruning;
  `config.<field>` gives the module a per-layer view of the config with `<field>` overridden);
- `pruned_norms`: `{norm module name: weight shape}` for query/key norms sliced with the heads (OLMo-2, Cohere);

and an `auto_map` pointing at one of the `Pruned*` classes below: the stock class, built as usual, then the listed
linears are replaced by ones of the recorded shapes before the weights are loaded.
"""

import torch.nn as nn
import transformers
from transformers.pytorch_utils import Conv1D

__all__ = ["apply_pruned_shapes", "set_module_attribute", "LayerConfig", "PRUNED_CLASSES"]

# stock class name -> pruned class name
PRUNED_CLASSES = {
    name: f"Pruned{name}" for name in (
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel",
        "GPTNeoXForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "GraniteForCausalLM", "CohereForCausalLM",
        "FalconForCausalLM")
}


class LayerConfig:
    """A per-layer view of a shared config: `overrides` first, every other attribute read live from `base`."""

    def __init__(self, base, overrides: dict):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_base", "_overrides"):
            raise AttributeError(name)
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_base"), name, value)


def set_module_attribute(module: nn.Module, name: str, value) -> None:
    """Sets `module.<name>`; `config.<field>` overrides `<field>` in a per-layer view of `module.config`."""
    if name.startswith("config."):
        config = module.config
        base = config._base if isinstance(config, LayerConfig) else config
        overrides = dict(config._overrides) if isinstance(config, LayerConfig) else {}
        overrides[name[len("config."):]] = value
        module.config = LayerConfig(base, overrides)
    else:
        setattr(module, name, value)


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
            set_module_attribute(module, key, value)
    for name, shape in (getattr(config, "pruned_norms", None) or {}).items():
        norm = model.get_submodule(name)
        for attribute in ("weight", "bias"):
            tensor = getattr(norm, attribute, None)
            if isinstance(tensor, nn.Parameter):
                setattr(norm, attribute, nn.Parameter(tensor.new_empty(shape)))


def _pruned_class(name: str, base: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_pruned_shapes(self, config)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "_auto_class": "AutoModelForCausalLM"})


for _stock, _pruned in PRUNED_CLASSES.items():
    if hasattr(transformers, _stock):
        globals()[_pruned] = _pruned_class(_pruned, getattr(transformers, _stock))
