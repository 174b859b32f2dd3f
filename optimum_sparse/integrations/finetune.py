"""A small causal-LM fine-tuning loop for LoRA on pruned models (plain PyTorch; the transformers `Trainer` works too)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data.calibration import load_texts, sample_windows, tokenize_texts
from ..engine.devices import execution_device
from ..utils import show_progress

__all__ = ["FinetuneResult", "finetune", "training_windows"]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What `finetune` did: the loss per step, the evaluations, the time.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall time of the loop, evaluations excluded.
        losses: training loss of every step.
        evaluations: `[{"step": int, "value": float, "seconds": float}]` from `eval_fn` (step 0 = before training).
    """

    steps: int = 0
    seconds: float = 0.0
    losses: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def training_windows(data: Any, tokenizer: Any, num_windows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Token windows `[num_windows, seq_len]` to train on.

    Args:
        data: a source name (`"wiki-offline"`, a `.txt`/`.jsonl` path, ...; its *calibration* split, never the held-out
            evaluation text), a list of strings, a 1-D tensor of token ids (windows sampled from it), or a 2-D tensor
            of windows (cycled in a seeded random order).
        tokenizer: needed for text sources.
        num_windows: windows wanted (steps x batch size).
        seq_len: tokens per window (ignored for 2-D tensors).
        seed: sampling seed.
    """
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            return sample_windows(data.long(), num_windows, seq_len, seed)
        if data.dim() == 2 and data.shape[0] > 0:
            generator = torch.Generator().manual_seed(seed)
            reps = math.ceil(num_windows / data.shape[0])
            order = torch.cat([torch.randperm(data.shape[0], generator=generator) for _ in range(reps)])[:num_windows]
            return data.long()[order]
        raise ValueError(f"train data tensors must be 1-D (a token stream) or 2-D [n, seq_len], got {tuple(data.shape)}.")
    stream = tokenize_texts(load_texts(data, "calibration"), tokenizer)
    return sample_windows(stream, num_windows, seq_len, seed)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return schedule


def finetune(
    model: nn.Module,
    train_data: Any = "wiki-offline",
    tokenizer: Any = None,
    steps: int = 300,
    batch_size: int = 4,
    seq_len: int = 256,
    learning_rate: float = 2e-4,
    weight_decay: float = 0.0,
    warmup_steps: Optional[int] = None,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    eval_fn: Optional[Callable[[nn.Module], float]] = None,
    eval_every: int = 100,
    log_every: int = 25,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tunes the trainable parameters of `model` (a peft model) on next-token prediction.

    AdamW on the parameters with `requires_grad`, linear warm-up then cosine decay, gradient clipping. Call
    `mask_lora_updates(model)` first to keep the merged model sparse *and* equal to the trained adapter model.

    Args:
        model: a peft model (e.g. `get_peft_model(pruned, LoraConfig(...))`).
        train_data: see `training_windows` (default: the calibration split of the bundled Wikipedia text).
        tokenizer: needed for text sources.
        steps: optimizer steps.
        batch_size: windows per step.
        seq_len: tokens per window.
        learning_rate, weight_decay, max_grad_norm: AdamW and clipping settings.
        warmup_steps: linear warm-up (default: 5% of `steps`).
        seed: seeds the data order and dropout.
        eval_fn: `eval_fn(model) -> float` (e.g. perplexity), called before training, every `eval_every` steps and at
            the end.
        eval_every: steps between evaluations.
        log_every: steps between loss log lines.
        progress: show a progress bar.

    Returns:
        A `FinetuneResult`.

    Raises:
        ValueError: bad settings, or no trainable parameter.
        RuntimeError: the loss became NaN/inf.
    """
    for name in ("steps", "batch_size", "seq_len", "eval_every", "log_every"):
        value = locals()[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"finetune: {name} must be a positive integer, got {value!r}.")
    if not learning_rate > 0:
        raise ValueError(f"finetune: learning_rate must be positive, got {learning_rate!r}.")
    if not hasattr(model, "peft_config"):
        raise ValueError(
            "finetune trains peft adapters only (full fine-tuning would refill the pruned weights): wrap the model "
            "with peft.get_peft_model(model, LoraConfig(...)) first."
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameter (is the adapter loaded with is_trainable=True?).")
    windows = training_windows(train_data, tokenizer, steps * batch_size, seq_len, seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(windows.max()) >= vocab:
        raise ValueError(f"finetune: token ids reach {int(windows.max())}, beyond the model's vocabulary ({vocab}).")
    device = execution_device(model)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, steps))
    result = FinetuneResult()

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        started = time.perf_counter()
        with torch.no_grad():
            value = float(eval_fn(model))
        result.evaluations.append({"step": step, "value": value, "seconds": time.perf_counter() - started})
        logger.info("step %d: eval %.4f", step, value)

    was_training = model.training
    torch.manual_seed(seed)
    evaluate(0)
    bar = tqdm(total=steps, desc="Fine-tuning", unit="step", disable=not show_progress(progress))
    loop_seconds = 0.0
    try:
        for step in range(1, steps + 1):
            started = time.perf_counter()
            model.train()
            batch = windows[(step - 1) * batch_size : step * batch_size].to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"finetune: the loss is {loss.item()} at step {step}; lower the learning rate.")
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
            result.steps = step
            loop_seconds += time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
            if step % log_every == 0:
                recent = result.losses[-log_every:]
                logger.info("step %d/%d: loss %.4f (%.2f s/step)", step, steps, sum(recent) / len(recent),
                            loop_seconds / step)
            if step % eval_every == 0 or step == steps:
                evaluate(step)
    finally:
        bar.close()
        model.train(was_training)
    result.seconds = loop_seconds
    return result
