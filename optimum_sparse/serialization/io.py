"""Saving a pruned model with its record, reading the record back (masks recovered), `model.save_pretrained`."""

from __future__ import annotations

import json
import logging
import os
import types
from typing import Any, Callable, Optional, Union

import torch.nn as nn

from ..config import CONFIG_NAME
from .atomic import atomic_directory
from .destination import check_output_dir
from .masks import load_masks as masks_from_files
from .record import (
    RECORD_NAME, SPARSITY_CONFIG_NAME, NotAPrunedModelError, PruningReport, build_sparsity_config, checkpoint_sparsity,
)

__all__ = [
    "register_card_writer", "save_pruned_model", "load_pruning_record", "load_sparsity_config", "check_pruned_folder",
    "attach_pruning_record", "detach_pruning_record", "attached_tokenizer", "PrunedSavePretrained",
]

logger = logging.getLogger(__name__)

# The model card is written by `optimum_sparse.hub`, which registers its writer here on import (the top package imports
# it): the save path calls hub, hub never depends on this module being able to import it (no import cycle).
_CARD_WRITER: Optional[Callable[..., Any]] = None
_FOLDER_PUSHER: Optional[Callable[..., Any]] = None


def register_card_writer(writer: Callable[..., Any], pusher: Optional[Callable[..., Any]] = None) -> None:
    """Sets the default `writer(folder, record, **card_kwargs)` that `save_pruned_model` uses for the model card, and
    the `pusher(folder, repo_id, **kwargs)` of `model.save_pretrained(..., push_to_hub=True)`."""
    global _CARD_WRITER, _FOLDER_PUSHER
    _CARD_WRITER = writer
    _FOLDER_PUSHER = pusher or _FOLDER_PUSHER


# ----- save ---------------------------------------------------------------------------------------------------------
def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def save_pruned_model(model: nn.Module, save_directory: Union[str, os.PathLike], record: PruningReport,
                      tokenizer: Any = None, model_card: bool = True, card_kwargs: Optional[dict] = None,
                      fsync: bool = True, overwrite: bool = False, card_writer: Optional[Callable[..., Any]] = None,
                      **save_kwargs) -> str:
    """Saves a pruned model with its pruning record, sparsity sidecar, tokenizer and model card, atomically.

    Args:
        model: the pruned `PreTrainedModel`.
        save_directory: target folder; replaced as a whole once the new content is complete.
        record: the run's `PruningReport` (`SparsePruner.record` or `model.pruning_record`).
        tokenizer: saved beside the model when given.
        model_card: write `README.md` (and `sparsity_plot.png` when matplotlib is installed).
        card_kwargs: extra arguments of `optimum_sparse.hub.card.build_model_card` (`repo_id`, `base_model`,
            `license`, ...).
        card_writer: `writer(folder, record, **card_kwargs)` of the card; default `optimum_sparse.hub.write_model_card`.
        fsync: flush files to disk before the swap.
        overwrite: replace a folder that already holds a model (`config.json` or weights); without it such a folder
            is refused with `OutputPathError` before anything is written.
        save_kwargs: passed to `model.save_pretrained` (`max_shard_size`, ...).

    Returns:
        The absolute path of the saved folder.
    """
    if not isinstance(record, PruningReport):
        raise TypeError(f"record must be a PruningReport, got {type(record).__name__}.")
    for key in ("push_to_hub", "repo_id"):
        if save_kwargs.get(key):
            raise ValueError(f"save_pruned_model does not take {key!r}; push with SparsePruner.push_to_hub.")
        save_kwargs.pop(key, None)
    card_writer = card_writer or _CARD_WRITER
    if model_card and card_writer is None:
        raise RuntimeError("No model-card writer registered: import optimum_sparse (it registers optimum_sparse.hub's), "
                           "pass card_writer=, or model_card=False.")
    final = check_output_dir(save_directory, overwrite=overwrite)
    with atomic_directory(final, fsync=fsync) as tmp:
        _plain_save(model)(tmp, **save_kwargs)
        _check_config_json(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record.config.save_pretrained(tmp)
        sidecar = build_sparsity_config(record, model, global_sparsity=checkpoint_sparsity(tmp))
        _write_json(os.path.join(tmp, SPARSITY_CONFIG_NAME), sidecar)
        _write_json(os.path.join(tmp, RECORD_NAME), record.to_dict())
        if model_card:
            card_writer(tmp, record, **(card_kwargs or {}))
    logger.info("Saved the pruned model to %s", final)
    return final


def _check_config_json(folder: str) -> None:
    """Our metadata never goes into config.json: a `sparsity_config` there makes vLLM refuse the model."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    quant = config.get("quantization_config") or {}
    if "sparsity_config" in config or (isinstance(quant, dict) and quant.get("sparsity_config")):
        raise ValueError("config.json carries a `sparsity_config`; recent vLLM refuses such models. Remove it from "
                         "model.config before saving (optimum-sparse writes sparsity metadata to sparsity_config.json).")


# ----- load ---------------------------------------------------------------------------------------------------------
def _resolve_folder(path: Union[str, os.PathLike], load_masks: bool, **hub_kwargs) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        raise NotAPrunedModelError(f"{path} is not a folder (nor a Hub repo id like 'namespace/name').")
    from huggingface_hub import snapshot_download

    patterns = ["*.json"] + (["*.safetensors"] if load_masks else [])
    return snapshot_download(path, allow_patterns=patterns, **hub_kwargs)


def check_pruned_folder(folder: Union[str, os.PathLike]) -> PruningReport:
    """Checks that `folder` holds a model saved by optimum-sparse; returns its record (without masks).

    Raises:
        `NotAPrunedModelError` naming what is missing.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise NotAPrunedModelError(f"{folder} is not a folder.")
    files = set(os.listdir(folder))
    missing = [f for f in ("config.json", CONFIG_NAME, SPARSITY_CONFIG_NAME, RECORD_NAME) if f not in files]
    if not any(f.endswith(".safetensors") for f in files):
        missing.append("*.safetensors weights")
    if missing:
        raise NotAPrunedModelError(
            f"{folder} is not a pruned model saved by optimum-sparse (missing: {', '.join(missing)}). Save it with "
            "`pruner.save_pretrained(model, folder)` or `optimum-sparse prune ... --output folder` first."
        )
    try:
        with open(os.path.join(folder, RECORD_NAME), encoding="utf-8") as f:
            record = PruningReport.from_dict(json.load(f))
        with open(os.path.join(folder, SPARSITY_CONFIG_NAME), encoding="utf-8") as f:
            sidecar = json.load(f)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise NotAPrunedModelError(f"{folder}: unreadable pruning metadata ({err}).") from err
    if not isinstance(sidecar, dict) or "format" not in sidecar:
        raise NotAPrunedModelError(f"{folder}/{SPARSITY_CONFIG_NAME} has no compressed-tensors `format` key.")
    return record


def load_sparsity_config(path: Union[str, os.PathLike], **hub_kwargs) -> dict:
    """Reads `sparsity_config.json` (compressed-tensors key names plus per-layer `layers`) from a folder or Hub repo.

    Raises:
        `FileNotFoundError` when the folder has none.
    """
    folder = _resolve_folder(path, load_masks=False, **hub_kwargs)
    file = os.path.join(folder, SPARSITY_CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"No {SPARSITY_CONFIG_NAME} in {folder}.")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def load_pruning_record(path: Union[str, os.PathLike], load_masks: bool = True, **hub_kwargs) -> PruningReport:
    """Reads back the pruning record of a saved pruned model, with its masks recovered from the zeros.

    Args:
        path: a folder written by `SparsePruner.save_pretrained` (or `model.save_pretrained` after pruning), or a Hub
            repo id (downloaded with `snapshot_download(**hub_kwargs)`).
        load_masks: read the pruned layers' weights and set `record.masks[name] = (weight == 0)` (from the files,
            no model built, experts saved fused or per expert; `serialization.masks`, whose `recover_masks(model,
            record)` checks them against a loaded model). A layer without a saved weight, or with fewer zeros than
            recorded, is warned about.

    Returns:
        `PruningReport`, with `masks` when `load_masks`.

    Example:

    ```python
    >>> record = load_pruning_record("out")
    >>> record.method, record.config.sparsity, record.perplexity
    ('sparsegpt', 0.5, {'dense': 14.1, 'pruned': 17.9, 'dataset': 'wiki-offline', 'seq_len': 512, 'windows': 40})
    >>> record.masks["model.layers.0.mlp.down_proj"].float().mean()
    tensor(0.5000)
    ```
    """
    folder = _resolve_folder(path, load_masks, **hub_kwargs)
    record = check_pruned_folder(folder)
    if load_masks:
        record.masks = masks_from_files(folder, record)
    return record


# ----- model.save_pretrained keeps the record -----------------------------------------------------------------------
_HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision")


class PrunedSavePretrained:
    """`model.save_pretrained` of a pruned model: the transformers checkpoint plus the pruning record, sidecar,
    tokenizer and card, written atomically through `save_pruned_model`.

    `SparsePruner.apply` installs one on the model instance (`attach_pruning_record`; `apply(..., attach=False)` does
    not); it holds the `record` and the `tokenizer` passed to `apply` as plain attributes, and `detach_pruning_record`
    removes it. The explicit path does the same without touching the model: `SparsePruner.save_pretrained(model,
    folder, tokenizer=...)` or `optimum_sparse.serialization.save_pruned_model(model, folder, record, tokenizer=...)`.

    Extra keyword arguments go to transformers' `save_pretrained`; `push_to_hub=True` pushes the saved folder with
    `optimum_sparse.hub.push_folder` (`repo_id`, `token`, `private`, `revision`, `commit_message`).
    """

    __name__ = "save_pretrained"

    def __init__(self, model: nn.Module, record: PruningReport, tokenizer: Any = None, inner: Any = None):
        self.model, self.record, self.tokenizer = model, record, tokenizer
        self.inner = inner  # another wrapper of this instance's save_pretrained, called for the checkpoint itself

    def plain(self) -> Callable[..., Any]:
        """The save_pretrained this one wraps (the class's, or an earlier instance wrapper)."""
        return self.inner or types.MethodType(type(self.model).save_pretrained, self.model)

    def __call__(self, save_directory, *args, **kwargs):
        if args or not kwargs.get("is_main_process", True):
            return self.plain()(save_directory, *args, **kwargs)
        push = kwargs.pop("push_to_hub", False)
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        token = kwargs.get("token")
        repo_id = hub.pop("repo_id", None) or (os.path.basename(os.path.abspath(os.fspath(save_directory)))
                                               if push else None)
        folder = save_pruned_model(self.model, save_directory, self.record, tokenizer=self.tokenizer,
                                   card_kwargs={"repo_id": repo_id}, **kwargs)  # the card is named after the repo
        if push:
            if _FOLDER_PUSHER is None:
                raise RuntimeError("No Hub pusher registered: import optimum_sparse (it registers optimum_sparse.hub's).")
            _FOLDER_PUSHER(folder, repo_id, token=token, **hub)
        return None


def _attached(model: nn.Module) -> Optional[PrunedSavePretrained]:
    current = model.__dict__.get("save_pretrained")
    return current if isinstance(current, PrunedSavePretrained) else None


def _plain_save(model: nn.Module):
    """The model's save_pretrained without our record-writing wrapper."""
    attached = _attached(model)
    if attached is not None:
        return attached.plain()
    return model.__dict__.get("save_pretrained") or types.MethodType(type(model).save_pretrained, model)


def attach_pruning_record(model: nn.Module, record: PruningReport, tokenizer: Any = None) -> PrunedSavePretrained:
    """Keeps `record` on the model (`model.pruning_record`) and installs `PrunedSavePretrained` as the instance's
    `save_pretrained`, so `model.save_pretrained(folder)` writes the record too (with `tokenizer`). Returns it."""
    model.__dict__["pruning_record"] = record
    attached = _attached(model)
    if attached is None:
        attached = PrunedSavePretrained(model, record, tokenizer, inner=model.__dict__.get("save_pretrained"))
        model.__dict__["save_pretrained"] = attached
    attached.record = record
    if tokenizer is not None:
        attached.tokenizer = tokenizer
    return attached


def detach_pruning_record(model: nn.Module) -> None:
    """Undoes `attach_pruning_record`: `model.save_pretrained` is transformers' again (the record stays readable as
    `model.pruning_record`)."""
    attached = _attached(model)
    if attached is None:
        return
    if attached.inner is not None:
        model.__dict__["save_pretrained"] = attached.inner
    else:
        del model.__dict__["save_pretrained"]


def attached_tokenizer(model: nn.Module) -> Any:
    """The tokenizer `attach_pruning_record` keeps for `model.save_pretrained` (`None` when none)."""
    attached = _attached(model)
    return attached.tokenizer if attached is not None else None
