"""ELSA on transformers' `Trainer`: the ADMM optimizer, the training windows, a progress bar, the final projection.

`run_elsa` is what `SparsePruner.apply` calls for `method="elsa"`. `ELSATrainer` is a `transformers.Trainer` whose
optimizer is the ADMM one (built from `TrainingArguments.optim`, so 8-bit optimizers work): use it in your own
training script to get multi-GPU/FSDP (`accelerate launch`), your own data or logging, then call `finalize()`:

```python
trainer = ELSATrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                      pruning_config=PruningConfig(method="elsa", sparsity=0.9, method_kwargs={"interval": 32}))
trainer.train()
masks = trainer.finalize()  # hard projection: the model is now exactly sparse
```

`ELSATrainer` reads only the ADMM settings from the config (sparsity, structure, targets, `penalty`, `interval`,
`alpha`, `projection`, `budget`, `low_memory`); the training settings are the `TrainingArguments`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..engine.block import LayerReport
from ..engine.devices import execution_device, solve_device
from ..engine.experts import ExpertLinear
from ..engine.sequential import PruningReport, check_targets
from .admm import ADMMSettings
from .admm_optimizer import ADMMMixin, admm_optimizer_class
from .base import get_method_class, warm_start_config
from .elsa import elsa_options

__all__ = ["ELSATrainer", "TokenWindows", "run_elsa", "admm_optimizer_of", "elsa_targets"]

logger = logging.getLogger(__name__)

_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _canonical(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name[len("module."):] if name.startswith("module.") else name


def admm_optimizer_of(optimizer: Any) -> ADMMMixin:
    """The ADMM optimizer inside the wrappers accelerate or the Trainer put around it."""
    seen = 0
    while not isinstance(optimizer, ADMMMixin):
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
        if optimizer is None or seen > 8:
            raise TypeError("This optimizer is not an ELSA/ADMM optimizer (built by ELSATrainer or admm_optimizer_class).")
    return optimizer


class TokenWindows(torch.utils.data.Dataset):
    """`length` training examples cycling over the rows of `input_ids` (`[n, seq_len]`) in seeded random order.

    Each pass over the windows uses a fresh permutation; items are `{"input_ids", "labels"}` (causal LM loss).
    """

    def __init__(self, input_ids: torch.Tensor, length: int, seed: int = 0):
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"Training windows must be a non-empty [n, seq_len] tensor, got {tuple(input_ids.shape)}.")
        self.input_ids = input_ids.long()
        generator = torch.Generator().manual_seed(seed)
        passes = math.ceil(length / input_ids.shape[0])
        self.order = torch.cat([torch.randperm(input_ids.shape[0], generator=generator) for _ in range(passes)])[:length]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        ids = self.input_ids[self.order[i]]
        return {"input_ids": ids, "labels": ids}


def elsa_targets(model: nn.Module, config, sparsity_for: Optional[Callable[[str], float]] = None) -> list[dict]:
    """The pruned weights: `[{"name": module name, "module", "sparsity", "transposed", "param"}]` in model order.

    A fused experts parameter is one entry (`name` = `param` = `<experts>.<projection>`) with `"slices"`: each
    expert's sparsity (0 for experts not targeted), storage orientation and layer name.

    Raises:
        ValueError: a target weight cannot be trained (no gradient, or not floating point).
    """
    spec, _, targets = check_targets(model, config)
    sparsity_for = sparsity_for or (lambda name: config.sparsity)
    out, fused = [], {}
    for i, linears in enumerate(targets):
        for name, module in linears.items():
            full = f"{spec.blocks}.{i}.{name}"
            if isinstance(module, ExpertLinear):
                _add_expert_slice(out, fused, full, module, float(sparsity_for(full)))
                continue
            weight = module.weight
            if not weight.is_floating_point():
                raise ValueError(f"ELSA trains the weights it prunes, but {full}.weight is {weight.dtype} (quantized?): "
                                 "load the model in float32 or bfloat16.")
            if not weight.requires_grad:
                raise ValueError(f"ELSA trains the weights it prunes, but {full}.weight has requires_grad=False: call "
                                 "model.requires_grad_(True) (or unfreeze the target linears) first.")
            out.append({"name": full, "module": module, "sparsity": float(sparsity_for(full)),
                        "transposed": type(module).__name__ == "Conv1D", "param": f"{full}.weight"})
    for target in fused.values():  # the fused parameter's sparsity: its slices' size-weighted mean
        target["sparsity"] = sum(target["slices"]["sparsities"]) / len(target["slices"]["sparsities"])
    return out


def _add_expert_slice(out: list, fused: dict, full: str, handle: ExpertLinear, sparsity: float) -> None:
    """ELSA trains a fused experts parameter as one weight whose expert slices are projected one by one."""
    param = handle.parameter
    name = f"{full.rsplit('.', 2)[0]}.{handle.projection}"  # <experts>.<projection>
    if name not in fused:
        if not param.is_floating_point() or not param.requires_grad:
            raise ValueError(f"ELSA trains the weights it prunes, but {name} is {param.dtype} with requires_grad="
                             f"{param.requires_grad}: load the model in float32/bfloat16 and unfreeze it.")
        count = param.shape[0]
        fused[name] = {"name": name, "module": handle.experts, "sparsity": 0.0, "transposed": False, "param": name,
                       "slices": {"sparsities": [0.0] * count, "transposed": handle.layout.transposed,
                                  "names": [None] * count}}
        out.append(fused[name])
    fused[name]["slices"]["sparsities"][handle.index] = sparsity
    fused[name]["slices"]["names"][handle.index] = full


class ELSAProgressCallback(TrainerCallback):
    """A progress bar over optimizer steps with the loss, the relative sparsity gap ‖x − z‖/‖x‖, λ and the ETA."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.bar = None
        self.postfix: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.disable:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="ELSA", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.3f}"
        if "admm_gap" in logs:
            self.postfix["gap"] = f"{logs['admm_gap']:.3g}"
        if "admm_penalty" in logs:
            self.postfix["λ"] = f"{logs['admm_penalty']:.3g}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ELSATrainer(Trainer):
    """A `transformers.Trainer` that runs ELSA: its optimizer is `TrainingArguments.optim`'s with the ADMM added.

    Args:
        pruning_config (`PruningConfig`): sparsity, structure, targets and the ADMM `method_kwargs` (`penalty`,
            `penalty_init`, `penalty_schedule`, `interval`, `alpha`, `projection`, `budget`, `low_memory`).
        sparsity_for (`Callable[[str], float]`, *optional*): per-layer sparsity by module name (layer-wise allocation).
        All other arguments are the `Trainer`'s.

    After `train()`, call `finalize()` for the hard projection that makes the model exactly sparse.
    """

    def __init__(self, *args, pruning_config, sparsity_for: Optional[Callable[[str], float]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pruning_config = pruning_config
        self.elsa_options = elsa_options(pruning_config)
        self.elsa_targets = elsa_targets(self.model, pruning_config, sparsity_for)
        for callback in (PrinterCallback, ProgressCallback):
            self.remove_callback(callback)
        self.add_callback(ELSAProgressCallback(disable=self.args.disable_tqdm))

    def admm_settings(self) -> ADMMSettings:
        opts = self.elsa_options
        return ADMMSettings(
            names=[t["name"] for t in self.elsa_targets], sparsities=[t["sparsity"] for t in self.elsa_targets],
            nm=self.pruning_config.nm, budget=opts["budget"], projection=opts["projection"], penalty=opts["penalty"],
            penalty_init=opts["penalty_init"], penalty_schedule=opts["penalty_schedule"],
            total_steps=max(self.args.max_steps, 1), interval=opts["interval"], alpha=opts["alpha"],
            low_memory=opts["low_memory"], transposed=[t["name"] for t in self.elsa_targets if t["transposed"]],
            slices={t["name"]: {k: t["slices"][k] for k in ("sparsities", "transposed")}
                    for t in self.elsa_targets if "slices" in t},
        )

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            base_kwargs = dict(base_kwargs)
            by_name = {_canonical(n): p for n, p in opt_model.named_parameters()}
            targets = []
            for t in self.elsa_targets:
                p = by_name.get(t["param"])
                if p is None:
                    raise ValueError(f"ELSA: no parameter {t['param']} in the model being trained.")
                targets.append(p)
            chosen = {id(p) for p in targets}
            decay = set(self.get_decay_parameter_names(opt_model))
            rest = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in chosen]
            groups = [{"params": targets, "admm": True, "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in rest if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
            self.optimizer = admm_optimizer_class(base_cls)(groups, admm=self.admm_settings(), **base_kwargs)
        return self.optimizer

    @property
    def admm_optimizer(self) -> ADMMMixin:
        return admm_optimizer_of(self.optimizer)

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if self.optimizer is not None and "loss" in logs:
            logs.update(self.admm_optimizer.admm_metrics)
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, TokenWindows):  # already in its seeded order, one pass = the whole run
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(dataset) if train_dataset is not None else super()._get_train_sampler()

    def finalize(self) -> dict:
        """The hard projection `x ← P_S(x)`; returns `{module name: mask}` (`True` = pruned, weight layout)."""
        if self.optimizer is None:
            raise RuntimeError("ELSATrainer.finalize() needs a trained optimizer: call train() first.")
        return self.admm_optimizer.final_projection()


def _low_memory_optim() -> str:
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_bnb_8bit"
    if importlib.util.find_spec("torchao") is not None:
        return "adamw_torch_8bit"
    logger.warning("ELSA-L: neither bitsandbytes (with CUDA) nor torchao is installed; using the 32-bit AdamW "
                   "(the ADMM states are still kept in float8/bfloat16).")
    return "adamw_torch"


def _precision(option: str, model: nn.Module, device: torch.device) -> dict:
    if option == "auto":
        fp32 = next(model.parameters()).dtype == torch.float32
        if device.type == "cuda" and fp32 and torch.cuda.is_bf16_supported():
            return {"bf16": True}
        return {}
    return {"bf16": True} if option == "bf16" else {"fp16": True} if option == "fp16" else {}


# transformers 5.x renamed gradient checkpointing to activation checkpointing (old names deprecated)
_NEW_CHECKPOINTING = "activation_checkpointing" in TrainingArguments.__dataclass_fields__


def _checkpointing_args(enabled: bool) -> dict:
    prefix = "activation_checkpointing" if _NEW_CHECKPOINTING else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def _is_checkpointing(model: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _disable_checkpointing(model: nn.Module) -> None:
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        if hasattr(model, name):
            getattr(model, name)()
            return


def _resume_checkpoint(opts: dict) -> Optional[str]:
    resume = opts["resume_from_checkpoint"]
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        folder = opts["output_dir"]
        found = get_last_checkpoint(folder) if os.path.isdir(folder) else None
        if found is None:
            logger.info("ELSA: no checkpoint in %s yet; starting from the beginning.", folder)
        return found
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"ELSA: checkpoint folder {resume} does not exist.")
    return resume


def run_elsa(model: nn.Module, input_ids: torch.Tensor, config, sparsity_for: Optional[Callable[[str], float]] = None,
             progress: bool = True, callbacks: Optional[list] = None, training_args: Optional[dict] = None) -> PruningReport:
    """Prunes `model` in place by ELSA (see `optimum_sparse.methods.elsa`) and returns the report.

    Args:
        model: a causal LM whose target weights can be trained.
        input_ids: the training windows `[n, seq_len]`.
        config: a `PruningConfig` with `method="elsa"`.
        sparsity_for: per-layer sparsity by module name.
        progress: show the progress bar.
        callbacks: extra `transformers.TrainerCallback`s (they receive the optimizer: `admm_optimizer_of(optimizer)
            .projected()` evaluates the sparse model mid-run).
        training_args: `TrainingArguments` overrides (on top of `method_kwargs["training_args"]`).
    """
    if input_ids is None:
        raise ValueError("ELSA needs training windows (calibration data).")
    opts = elsa_options(config)
    started = time.perf_counter()
    elsa_targets(model, config, sparsity_for)  # every check before any weight changes
    resume = _resume_checkpoint(opts)
    warm_report = None
    warm_config = warm_start_config(config, opts)
    if warm_config is not None and resume is None:
        warm_ids = input_ids[: opts["warm_start_samples"]]
        logger.info("ELSA: warm start with %s on %d windows.", warm_config.method, warm_ids.shape[0])
        warm_report = get_method_class(warm_config.method)(warm_config).prune_model(model, warm_ids, sparsity_for, progress)

    device = solve_device(model, config.device)  # where the Trainer will put the model
    original_device = execution_device(model)
    device_mapped = len(set(getattr(model, "hf_device_map", {}).values())) > 1
    optim = opts["optimizer"] or (_low_memory_optim() if opts["low_memory"] else "adamw_torch")
    temporary = None
    output_dir = opts["output_dir"]
    if output_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="elsa-")
        output_dir = temporary.name
    args = dict(
        output_dir=output_dir, max_steps=opts["steps"], per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=opts["gradient_accumulation_steps"], learning_rate=opts["learning_rate"],
        lr_scheduler_type=opts["lr_scheduler"], warmup_steps=opts["warmup_steps"], weight_decay=opts["weight_decay"],
        adam_beta1=opts["adam_beta1"], adam_beta2=opts["adam_beta2"], max_grad_norm=opts["max_grad_norm"],
        **_checkpointing_args(opts["gradient_checkpointing"]),
        logging_steps=opts["logging_steps"], save_strategy="steps" if opts["save_steps"] else "no",
        save_steps=opts["save_steps"] or 500, save_total_limit=opts["save_total_limit"] or None, report_to="none",
        seed=config.seed, optim=optim, disable_tqdm=not progress, remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=device.type == "cpu", **_precision(opts["precision"], model, device),
    )
    args.update(opts["training_args"])
    args.update(training_args or {})
    arguments = TrainingArguments(**args)
    per_step = arguments.per_device_train_batch_size * arguments.gradient_accumulation_steps * arguments.world_size
    data = TokenWindows(input_ids, arguments.max_steps * per_step, seed=config.seed)
    if len(data) > input_ids.shape[0]:
        logger.info("ELSA: %d steps x %d windows per step reuse each of the %d windows about %.1f times.",
                    arguments.max_steps, per_step, input_ids.shape[0], len(data) / input_ids.shape[0])
    was_training, was_checkpointing = model.training, _is_checkpointing(model)
    trainer = ELSATrainer(model=model, args=arguments, train_dataset=data, pruning_config=config,
                          sparsity_for=sparsity_for, callbacks=list(callbacks or []))
    try:
        output = trainer.train(resume_from_checkpoint=resume)
        masks = trainer.finalize()
    finally:
        if opts["gradient_checkpointing"] and not was_checkpointing:
            _disable_checkpointing(model)
        model.train(was_training)
        if not device_mapped and execution_device(model) != original_device:
            model.to(original_device)
        if temporary is not None:
            temporary.cleanup()
    report = PruningReport(method=config.method)
    for target in trainer.elsa_targets:
        mask = masks[target["name"]]
        if "slices" in target:  # fused experts: one layer per targeted expert slice, `[out, in]`
            slices = target["slices"]
            for e, name in enumerate(slices["names"]):
                if name is not None:
                    m = mask[e].t() if slices["transposed"] else mask[e]
                    report.layers.append(LayerReport(name=name, shape=tuple(m.shape), sparsity=float(m.float().mean())))
            continue
        weight = target["module"].weight
        shape = tuple(weight.shape[::-1]) if target["transposed"] else tuple(weight.shape)
        report.layers.append(LayerReport(name=target["name"], shape=shape, sparsity=float(mask.float().mean())))
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    report.diagnostics["elsa"] = {
        "steps": trainer.state.global_step, "resumed_from": os.path.basename(resume) if resume else None,
        "train_seconds": round(output.metrics.get("train_runtime", 0.0), 2), "windows_per_step": per_step,
        "admm": trainer.admm_settings().to_dict(), "optimizer": type(trainer.admm_optimizer).__name__,
        "history": history,
    }
    if warm_report is not None:
        report.diagnostics["warm_start"] = {"method": warm_report.method, "seconds": round(warm_report.seconds, 2),
                                            "mean_sparsity": warm_report.mean_sparsity}
    report.seconds = time.perf_counter() - started
    return report
