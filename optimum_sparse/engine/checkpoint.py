"""Resumable runs: the engine's state after each pruned block, written atomically.

A checkpoint folder holds, after block `b`:

- `block_<b>.safetensors`: the pruned weights of block `b`'s target linears, in the model's dtype;
- `hidden.safetensors`: the calibration hidden states block `b + 1` receives (the pruned blocks' outputs);
- `state.json`: the run's fingerprint (config, model, input embeddings, calibration tokens), a digest of every
  finished block's dense target weights, the next block to prune and the report so far. It is replaced last, so a run
  killed at any point leaves a consistent checkpoint of its last finished block.

Resuming recaptures the block-0 keyword arguments (deterministic), checks that the dense weights of every finished
block hash to the digests recorded when they were first onloaded (a fine-tuned variant of the same shape is refused
with `CheckpointMismatchError` before any block is replaced), writes the saved weights back, restores the hidden
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

from ..errors import CheckpointMismatchError
from ..utils import atomic_write, atomic_write_text
from .linears import write_weight

__all__ = ["CheckpointMismatchError", "RunCheckpoint", "run_fingerprint", "tensor_digest"]

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
HIDDEN_NAME = "hidden.safetensors"
FORMAT_VERSION = 2  # 2: dense weight digests per block and of the input embeddings


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_digest(tensors) -> str:
    """BLAKE2b of the raw bytes of `tensors` (in order): device- and dtype-exact, copied to the CPU one at a time."""
    h = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        h.update(str((tuple(cpu.shape), str(cpu.dtype))).encode())
        h.update(cpu.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def run_fingerprint(model: nn.Module, config, input_ids: Optional[torch.Tensor]) -> dict:
    """What must be equal for a checkpoint to be resumed: the pruning config, the model (config, class, size, input
    embeddings) and the calibration tokens. The blocks' dense weights are checked per block (`RunCheckpoint.check_dense`)."""
    model_config = getattr(model, "config", None)
    model_dict = model_config.to_diff_dict() if hasattr(model_config, "to_diff_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        model_dict.pop(volatile, None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    return {
        "format": FORMAT_VERSION,
        "embeddings": tensor_digest([weight]) if weight is not None and weight.device.type != "meta" else None,
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
        self.dense_digests: dict[str, str] = dict((self.state or {}).get("dense_digests", {}))

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

    def note_dense(self, index: int, linears: dict[str, nn.Module]) -> None:
        """Records the digest of block `index`'s dense target weights (call with the block onloaded, before pruning)."""
        self.dense_digests[str(index)] = _linears_digest(linears)

    def check_dense(self, index: int, linears: dict[str, nn.Module]) -> None:
        """Raises `CheckpointMismatchError` when block `index`'s dense weights are not those the checkpoint started from."""
        expected = self.dense_digests.get(str(index))
        if expected is None or expected != _linears_digest(linears):
            raise CheckpointMismatchError(
                f"The checkpoint in {self.folder} was written by a different run: the dense weights of block {index} "
                "differ from those it pruned (another model or fine-tune of the same shape); resume it with the same "
                "model, config and calibration data, or use another folder. Nothing was changed."
            )

    def save(self, index: int, linears: dict[str, nn.Module], hidden: Optional[list], report) -> None:
        """Records block `index` as done: its pruned target weights, the next block's hidden states, the report."""
        weights = {name: module.weight.detach().cpu().contiguous() for name, module in linears.items()}
        if any(w.device.type == "meta" for w in weights.values()):
            raise RuntimeError("Checkpointing needs the block's weights onloaded.")
        self.save_tensors(index, weights, hidden, report)

    def save_tensors(self, index: int, tensors: dict[str, torch.Tensor], hidden: Optional[list], report) -> None:
        """Records block `index` as done with `tensors` as its saved state (pruned weights, or the kept indices of a
        run that changes shapes), the next block's hidden states and the report."""
        _atomic_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, self._block_path(index))
        if hidden is not None:
            _atomic_save({str(i): h.detach().cpu().contiguous() for i, h in enumerate(hidden)},
                         os.path.join(self.folder, HIDDEN_NAME))
        self.state = {
            "fingerprint": self.fingerprint,
            "next_block": index + 1,
            "dense_digests": {k: v for k, v in self.dense_digests.items() if int(k) <= index},
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


def _linears_digest(linears: dict[str, nn.Module]) -> str:
    return tensor_digest(module.weight for _, module in sorted(linears.items()))


def _atomic_save(tensors: dict, path: str) -> None:
    """safetensors file written atomically (`utils.atomic_write`)."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
