"""ELSA (Lee, Jang, Lee, Alistarh & Lee, ICLR 2026): surrogate-free pruning by ADMM on the model's own loss.

Instead of reconstructing each layer's outputs, ELSA solves `min_x f(x) s.t. x ∈ S` for the whole model, with `f` the
next-token cross-entropy on the calibration text and `S` the sparsity set of the pruned linears, by ADMM on the split
`x = z`:

* x-step (inexact): `interval` (K) optimizer steps on `f(x) + λ/2 ‖x − z + u‖²` (gradient clipping applies to `∇f`
  only; the proximal gradient `λ(x − z + u)` is added after it, then the base optimizer (AdamW) steps);
* z-step: `z ← P_S(x + u)`, the projection keeping the largest `|x + u|` (`projection="magnitude"`) or the largest
  `v ⊙ (x + u)²` with `v` Adam's second moment (`"second_moment"`, ELSA's objective-aware projection), per weight
  matrix (`budget="layer"`, as ELSA's code) or over all pruned weights together (`"global"`, as the paper writes it);
  unstructured or N:M;
* u-step: `u ← u + α(x − z)`;
* λ constant or scheduled (`linear`, `cosine`, `exponential` from `penalty_init` to `penalty`); the scaled dual is
  rescaled when λ changes;
* at the end, the hard projection `x ← P_S(x)`: the returned model is exactly sparse.

Every parameter with `requires_grad` is trained (embeddings, norms and biases too, as in ELSA); only the target linears
get the constraint. The run goes through transformers' `Trainer` (`optimum_sparse.integrations.elsa.ELSATrainer`), so
gradient checkpointing, mixed precision, multi-GPU (DDP/FSDP through `accelerate launch`), checkpoints and resumption
work as they do there. ELSA-L (`low_memory=True`) keeps `z` in float8 and `u` in bfloat16 and uses an 8-bit AdamW
when bitsandbytes or torchao is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from .admm import PENALTY_SCHEDULES, PROJECTIONS
from ..options import Options, option
from .base import PruningMethod, register_method, warm_start_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..engine.sequential import PruningReport

__all__ = ["ELSAPruning", "ELSAOptions", "ELSA_DEFAULTS"]

@dataclass
class ELSAOptions(Options):
    """`method_kwargs` of `method="elsa"`."""

    label = "ELSA"

    steps: int = option(512, "Optimizer steps (ELSA's admm_steps).")
    learning_rate: float = option(2e-4, "Learning rate.")
    lr_scheduler: str = option("linear", "Any transformers lr_scheduler_type; 'linear' decays to 0 as ELSA.")
    warmup_steps: int = option(0, "Warm-up steps of the learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.95, "AdamW beta2.")
    max_grad_norm: float = option(1.0, "Gradient clipping (of the loss gradient only).")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    gradient_checkpointing: bool = option(True, "Recompute activations in the backward pass.")
    penalty: float = option(0.01, "λ, the ADMM penalty (the final value of a schedule).")
    penalty_init: Optional[float] = option(None, "Start of the λ schedule (default: constant λ).")
    penalty_schedule: str = option("constant", "'constant', 'linear', 'cosine' or 'exponential'.")
    interval: int = option(32, "K: optimizer steps between z/u updates.")
    alpha: float = option(1.0, "Dual step.")
    projection: str = option("magnitude", "'magnitude' or 'second_moment' (objective-aware projection).")
    budget: str = option("layer", "Sparsity per weight matrix ('layer') or over all pruned weights ('global').")
    low_memory: bool = option(False, "ELSA-L: z in float8, u in bfloat16, 8-bit AdamW when installed.")
    optimizer: Optional[str] = option(None, "A transformers optim name (default: adamw_torch; 8-bit AdamW for "
                                            "ELSA-L when installed).")
    precision: str = option("auto", "'auto' (bf16 autocast on a GPU that has it, else fp32), 'fp32', 'bf16', 'fp16'.")
    output_dir: Optional[str] = option(None, "Folder of the checkpoints (default: no checkpoints).")
    save_steps: int = option(0, "Steps between checkpoints (0: none).")
    save_total_limit: int = option(2, "Checkpoints kept.")
    resume_from_checkpoint: Any = option(None, "True (the latest in output_dir) or a checkpoint folder.", cli=False)
    logging_steps: int = option(1, "Steps between log lines.")
    warm_start: Optional[str] = option(None, "A layer-wise method run first (its pruned model starts the ADMM), "
                                             "e.g. 'sparsegpt'.")
    warm_start_kwargs: dict = option(default_factory=dict, help="The warm-start method's method_kwargs.", cli=False)
    warm_start_samples: int = option(128, "Calibration windows given to the warm-start method (the first ones).")
    training_args: dict = option(default_factory=dict, help="Further transformers TrainingArguments (fsdp, ddp_*, "
                                                            "report_to, ...).", cli=False)

    def check(self, config) -> None:
        _check(self.to_dict(), config)


ELSA_DEFAULTS: dict[str, Any] = ELSAOptions.defaults()


def elsa_options(config) -> dict:
    """The `method_kwargs` of an ELSA config over `ELSA_DEFAULTS` (unknown keys raise `ValueError`)."""
    return ELSAOptions.from_kwargs(config.method_kwargs, f"method {config.method!r}").to_dict()


def _number(opts: dict, key: str, minimum: float, strict: bool, label: str = "") -> None:
    value = opts[key]
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"method_kwargs[{key!r}]{label} must be a number {bound}, got {value!r}.")


def _integer(opts: dict, key: str, minimum: int, label: str = "") -> None:
    value = opts[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"method_kwargs[{key!r}]{label} must be an integer >= {minimum}, got {value!r}.")


def _check(opts: dict, config) -> None:
    _number(opts, "penalty", 0.0, strict=True, label=" (λ)")
    if opts["penalty_init"] is not None:
        _number(opts, "penalty_init", 0.0, strict=opts["penalty_schedule"] == "exponential", label=" (λ at step 0)")
    if opts["penalty_schedule"] not in PENALTY_SCHEDULES:
        raise ValueError(f"method_kwargs['penalty_schedule'] must be one of {list(PENALTY_SCHEDULES)}, "
                         f"got {opts['penalty_schedule']!r}.")
    if opts["penalty_schedule"] != "constant" and opts["penalty_init"] is None:
        raise ValueError(f"method_kwargs['penalty_schedule']={opts['penalty_schedule']!r} needs 'penalty_init' "
                         "(λ at step 0; 'penalty' is λ at the end).")
    _integer(opts, "interval", 1, label=" (K, steps between dual updates)")
    for key in ("steps", "gradient_accumulation_steps", "logging_steps", "warm_start_samples"):
        _integer(opts, key, 1)
    for key in ("warmup_steps", "save_steps", "save_total_limit"):
        _integer(opts, key, 0)
    _number(opts, "learning_rate", 0.0, strict=True)
    _number(opts, "alpha", 0.0, strict=True)
    for key in ("weight_decay", "max_grad_norm"):
        _number(opts, key, 0.0, strict=False)
    for key in ("adam_beta1", "adam_beta2"):
        _number(opts, key, 0.0, strict=False)
        if not opts[key] < 1:
            raise ValueError(f"method_kwargs[{key!r}] must be below 1, got {opts[key]!r}.")
    if opts["projection"] not in PROJECTIONS:
        raise ValueError(f"method_kwargs['projection'] must be one of {list(PROJECTIONS)}, got {opts['projection']!r}.")
    if opts["budget"] not in ("layer", "global"):
        raise ValueError(f"method_kwargs['budget'] must be 'layer' or 'global', got {opts['budget']!r}.")
    if opts["budget"] == "global" and config.nm is not None:
        raise ValueError(f"method_kwargs['budget']='global' is for unstructured sparsity; {config.structure} "
                         "fixes the count in every group of M weights.")
    if opts["precision"] not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"method_kwargs['precision'] must be 'auto', 'fp32', 'bf16' or 'fp16', got {opts['precision']!r}.")
    for key in ("gradient_checkpointing", "low_memory"):
        if not isinstance(opts[key], bool):
            raise ValueError(f"method_kwargs[{key!r}] must be True or False, got {opts[key]!r}.")
    if opts["save_steps"] and not opts["output_dir"]:
        raise ValueError("method_kwargs['save_steps'] needs an 'output_dir' for the checkpoints.")
    resume = opts["resume_from_checkpoint"]
    if resume is not None and not isinstance(resume, (bool, str)):
        raise ValueError(f"method_kwargs['resume_from_checkpoint'] must be True or a folder, got {resume!r}.")
    if resume is True and not opts["output_dir"]:
        raise ValueError("method_kwargs['resume_from_checkpoint']=True needs the 'output_dir' of the run.")
    if not isinstance(opts["training_args"], dict):
        raise ValueError(f"method_kwargs['training_args'] must be a dict, got {opts['training_args']!r}.")
    warm_start_config(config, opts)  # validates the warm-start method and its kwargs


@register_method
class ELSAPruning(PruningMethod):
    """ELSA: ADMM on the language-modelling loss of the whole model (see the module docstring).

    The calibration windows (`num_samples` × `seq_len` tokens of `dataset`) are the training data: each optimizer
    step takes the next `batch_size × gradient_accumulation_steps` of them (per device), cycling in a seeded random
    order; ELSA draws fresh windows every step, so give `num_samples ≥ steps × batch_size × accumulation` to do the
    same. `method_kwargs`: `ELSAOptions`.
    """

    name = "elsa"
    whole_model = True  # trains the whole model on its own shard of the data (transformers' Trainer)
    stats = "none"  # no layer statistics; the calibration windows are the training data
    options_class = ELSAOptions
    per_linear = False

    @property
    def needs_calibration(self) -> bool:
        return True

    def prune_weight(self, weight, stats, sparsity):
        raise NotImplementedError("ELSA prunes the whole model at once (prune_model), not one weight at a time.")

    def prune_block(self, job) -> None:
        raise NotImplementedError("ELSA prunes the whole model at once (prune_model), not block by block.")

    def prune_model(self, model: "torch.nn.Module", input_ids: Optional["torch.Tensor"],
                    sparsity_for: Optional[Callable[[str], float]] = None, progress: bool = True,
                    tokenizer: Any = None, checkpoint: Any = None) -> "PruningReport":
        from .elsa_trainer import run_elsa

        if checkpoint is not None:
            raise ValueError("ELSA checkpoints and resumes through its own Trainer state, not checkpoint_dir.")

        return run_elsa(model, input_ids, self.config, sparsity_for=sparsity_for, progress=progress)
