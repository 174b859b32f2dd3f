"""Resumable runs: the engine's state after each pruned block, written atomically.

A checkpoint folder holds, after block `b`:

- `block_<b>.safetensors`: the pruned weights of block `b`'s target linears, in the model's dtype;
- `hidden.safetensors`: the calibration hidden states block `b + 1` receives (the pruned blocks' outputs);
- `state.json`: the run's fingerprint (config, model, calibration tokens), the next block to prune and the report
  so far. It is replaced last, so a run killed at any point leaves a consistent checkpoint of its last finished block.

Resuming recaptures the block-0 keyword arguments (deterministic), writes the saved weights back, restores the hidden
states and continues at the first unfinished block; the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..utils import atomic_write_text
from .linears import write_weight

__all__ = ["CheckpointMismatchError", "RunCheckpoint", "run_fingerprint"]

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
HIDDEN_NAME = "hidden.safetensors"
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint folder belongs to a run with another config, model or calibration set."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_fingerprint(model: nn.Module, config, input_ids: Optional[torch.Tensor]) -> dict:
    """What must be equal for a checkpoint to be resumed: the pruning config, the model and the calibration tokens."""
    model_config = getattr(model, "config", None)
    model_dict = model_config.to_diff_dict() if hasattr(model_config, "to_diff_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        model_dict.pop(volatile, None)
    return {
        "format": FORMAT_VERSION,
        "config": _digest(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()),
        "model": _digest(json.dumps(model_dict, sort_keys=True, default=str).encode()),
        "model_class": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "calibration": _digest(input_ids.cpu().contiguous().numpy().tobytes()) if input_ids is not None else None,
    }


class RunCheckpoint:
    """The checkpoint folder of one pruning run.

    Args:
        folder: where the checkpoint lives (created if missing).
        fingerprint: `run_fingerprint(model, config, input_ids)` of the current run.
        resume: continue from the folder's state. Without it, a folder that already holds a checkpoint is refused.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict, resume: bool = False):
        self.folder = os.fspath(folder)
        self.fingerprint = fingerprint
        self.state = self._read_state()
        if self.state is not None:
            if not resume:
                raise FileExistsError(
                    f"{self.folder} already holds a pruning checkpoint (next block {self.state['next_block']}); pass "
                    "resume=True (CLI: --resume) to continue it, or choose an empty checkpoint folder."
                )
            different = sorted(k for k in fingerprint if self.state["fingerprint"].get(k) != fingerprint[k])
            if different:
                raise CheckpointMismatchError(
                    f"The checkpoint in {self.folder} was written by a different run ({', '.join(different)} differ); "
                    "resume it with the same model, config and calibration data, or use another folder."
                )
        os.makedirs(self.folder, exist_ok=True)

    def _read_state(self) -> Optional[dict]:
        path = os.path.join(self.folder, STATE_NAME)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    @property
    def next_block(self) -> int:
        return self.state["next_block"] if self.state else 0

    def _block_path(self, index: int) -> str:
        return os.path.join(self.folder, f"block_{index:05d}.safetensors")

    def save(self, index: int, linears: dict[str, nn.Module], hidden: Optional[list], report) -> None:
        """Records block `index` as done: its pruned target weights, the next block's hidden states, the report."""
        weights = {name: module.weight.detach().cpu().contiguous() for name, module in linears.items()}
        if any(w.device.type == "meta" for w in weights.values()):
            raise RuntimeError("Checkpointing needs the block's weights onloaded.")
        _atomic_save(weights, self._block_path(index))
        if hidden is not None:
            _atomic_save({str(i): h.detach().cpu().contiguous() for i, h in enumerate(hidden)},
                         os.path.join(self.folder, HIDDEN_NAME))
        self.state = {
            "fingerprint": self.fingerprint,
            "next_block": index + 1,
            "layers": [layer.to_dict() for layer in report.layers],
            "blocks": report.blocks,
        }
        atomic_write_text(os.path.join(self.folder, STATE_NAME), json.dumps(self.state, indent=1, default=float))

    def restore_block(self, index: int, linears: dict[str, nn.Module]) -> None:
        """Writes the saved pruned weights of block `index` back into its (onloaded) linears."""
        saved = load_file(self._block_path(index))
        missing = sorted(set(linears) ^ set(saved))
        if missing:
            raise CheckpointMismatchError(f"Checkpoint block {index} does not match the model's linears: {missing}.")
        for name, module in linears.items():
            weight = saved[name]
            write_weight(module, (weight.t() if type(module).__name__ == "Conv1D" else weight).float(), name)

    def restore_report(self, report) -> None:
        """Puts the layers and blocks of the finished blocks back into `report`."""
        from .block import LayerReport

        for entry in self.state["layers"]:
            entry = dict(entry)
            name, shape, sparsity = entry.pop("name"), tuple(entry.pop("shape")), entry.pop("sparsity")
            report.layers.append(LayerReport(name, shape, sparsity, entry.pop("relative_error", None), entry))
        report.blocks.extend(self.state["blocks"])

    def restore_hidden(self) -> list:
        saved = load_file(os.path.join(self.folder, HIDDEN_NAME))
        return [saved[str(i)] for i in range(len(saved))]


def _atomic_save(tensors: dict, path: str) -> None:
    """safetensors file written beside `path`, flushed, then renamed over it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
