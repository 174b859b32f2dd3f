"""SparseLLM, the method: the lifecycle around the FFN solver of `sparsellm.py` (the tensor math).

Per block: attention (and every linear outside an FFN) by SparseGPT; for the FFN, hooks capture its input and output
on the block's calibration batches (`BlockJob.capture`), the storage device of the activations is chosen (CUDA memory
probing), the layout is checked against the captured output, `solve_ffn` runs with the engine's all-reduce (several
processes), and the weights are written back (`BlockJob.apply_weight`). Mixture-of-experts blocks: `sparsellm_moe.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..engine.distributed import all_reduce_scalar, all_reduce_sum
from ..engine.experts import ExpertLinear
from ..engine.linears import read_weight
from ..options import Options, option
from .base import PruningMethod, register_method
from .masks import layer_nm
from .sparsegpt import SparseGPTPruning, sparsegpt_factor, sparsegpt_prune
from .sparsellm import FFNProblem, _ffn_inner, _linear, solve_ffn

__all__ = ["SparseLLMPruning", "SparseLLMOptions"]

logger = logging.getLogger(__name__)


@dataclass
class SparseLLMOptions(Options):
    """`method_kwargs` of `method="sparsellm"`."""

    label = "SparseLLM"

    iterations: int = option(1, "Alternating passes over the FFN's auxiliary variables (0: SparseGPT on each linear).")
    alpha: float = option(1.0, "Weight of the up/gate output term (scale-free).")
    beta: float = option(1.0, "Weight of the activation term (scale-free).")
    gamma: float = option(1.0, "Weight of the down output term (scale-free).")
    newton_steps: int = option(2, "Newton steps of the activation update.")
    refit_down: bool = option(True, "Refit the down projection on its final mask.")
    chunk_tokens: int = option(4096, "Tokens per chunk of the FFN activations.")
    activation_device: Optional[str] = option(None, "Where the FFN activations live (default: the solve device when "
                                                    "they fit in a quarter of its free memory, else CPU).")
    ffn_target: str = option("dense_ffn", "Target of the FFN solve: the dense FFN's outputs on the pruned inputs "
                                          "('dense_ffn') or the dense model's ('dense_model').",
                             choices=("dense_ffn", "dense_model"))

    def check(self, config) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"method_kwargs['iterations'] must be an integer >= 0, got {self.iterations!r}.")
        for key in ("alpha", "beta", "gamma"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"method_kwargs[{key!r}] must be a positive number, got {value!r}.")
        if self.ffn_target not in ("dense_ffn", "dense_model"):
            raise ValueError(
                f"method_kwargs['ffn_target'] must be 'dense_ffn' or 'dense_model', got {self.ffn_target!r}."
            )


def _resolve(block: nn.Module, path: str):
    obj = block
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@register_method
class SparseLLMPruning(PruningMethod):
    """SparseLLM: attention by SparseGPT, each FFN solved jointly (see the module docstring).

    `method_kwargs`: `SparseLLMOptions` (`iterations`, `alpha`/`beta`/`gamma`, `newton_steps`, `refit_down`,
    `chunk_tokens`, `activation_device`: auto, the solve device when the FFN activations fit in a quarter of its free
    memory, else CPU; `ffn_target`).
    """

    name = "sparsellm"
    stats = "hessian"
    column_blocks = True
    options_class = SparseLLMOptions
    per_linear = False  # the FFN is solved jointly

    def __init__(self, config):
        super().__init__(config)
        self.local = SparseGPTPruning(config)
        self._dense_stream: Optional[tuple[int, list]] = None  # (block index, dense model's block outputs)

    def prune_weight(self, weight, stats, sparsity):
        return self.local.prune_weight(weight, stats, sparsity)

    def _ffn_names(self, job) -> Optional[tuple[Optional[str], str, str]]:
        mlp = job.spec.mlp
        if mlp is None:
            return None
        names = (mlp.gate, mlp.up, mlp.down)
        if any(n is not None and n not in job.linears for n in names):
            return None
        return names

    def _dense_outputs(self, job) -> list:
        """Outputs of this block, still dense, on the dense model's own stream (advanced block by block)."""
        stream = self._dense_stream
        if job.index == 0 or stream is None or stream[0] != job.index - 1:
            if job.index != 0:
                logger.warning("Block %d: the dense stream restarts here (a block was skipped).", job.index)
            hidden = job.inputs.hidden
        else:
            hidden = stream[1]
        outputs = [job.forward_batch(i, hidden[i]).to(hidden[i].device) for i in range(len(job.inputs))]
        self._dense_stream = (job.index, outputs)
        return outputs

    def prune_block(self, job) -> None:
        dense_outputs = self._dense_outputs(job) if self.options.ffn_target == "dense_model" else None
        names = self._ffn_names(job)
        experts = [n for n, m in job.linears.items() if isinstance(m, ExpertLinear)]
        if experts:  # a mixture-of-experts block: methods/sparsellm_moe.py
            self._prune_moe_block(job, experts)
            return
        if names is None:
            logger.warning("Block %d: no known FFN layout among the targets; pruning it with SparseGPT.", job.index)
            job.prune_locally(self.local)
            return
        gate, up, down = names
        ffn = {n for n in names if n is not None}
        others = [n for n in job.linears if n not in ffn]
        if others:
            job.prune_locally(self.local, names=others)
        self._prune_ffn(job, gate, up, down, dense_outputs)

    def _prune_moe_block(self, job, experts: list[str]) -> None:
        """Attention (and other linears) by SparseGPT, each shared/dense FFN jointly, then each expert jointly."""
        from ..engine.architectures import MLPSpec
        from .sparsellm_moe import block_ffns, prune_experts

        ffns = block_ffns(job)
        in_ffn = {n for ffn in ffns for n in ffn[:3] if n is not None}
        others = [n for n in job.linears if n not in in_ffn and n not in experts]
        if others:
            job.prune_locally(self.local, names=others)
        for gate, up, down, act in ffns:  # the FFN's own output as target: a shared expert's is gated afterwards
            self._prune_ffn(job, gate, up, down, None, MLPSpec(down=down, up=up, gate=gate, activation=act,
                                                               adds_to_residual=False))
        prune_experts(self, job, experts)

    @torch.no_grad()
    def _prune_ffn(self, job, gate: Optional[str], up: str, down: str, dense_outputs: Optional[list] = None,
                   mlp=None) -> None:
        opts, cfg, device = self.options, self.config, job.device
        mlp = mlp or job.spec.mlp
        act = _resolve(job.block, mlp.activation)
        gated = mlp.gated
        modules = {"up": job.linears[up], "down": job.linears[down]}
        if gate is not None:
            modules["gate"] = job.linears[gate]

        # X: FFN input (after the pruned attention); Y: dense FFN output
        storage = self._storage_device(job, device, mlp)
        captured = {"up": [], "down": [], "gate": []}

        def grab(name, inp, out):
            if name == "gate" and captured["gate"]:
                return  # the first batch's gate input is enough to check that gate and up read the same tensor
            t = out if name == "down" else inp
            captured[name].append(t.reshape(-1, t.shape[-1]).to(storage, torch.float32))

        if dense_outputs is not None and not (mlp.adds_to_residual and getattr(job.block, "do_layer_norm_before", True)):
            logger.warning("Block %d: the FFN output is normalised before the residual; using ffn_target='dense_ffn'.",
                           job.index)
            dense_outputs = None
        # Full forwards only where the block output is needed (the dense-model target) and on the first batch, whose
        # FFN output checks the formula; the other batches stop at the FFN input, and the dense FFN output is then
        # computed from the weights (SparseLLM's first pass does it anyway).
        full = len(job.inputs) if dense_outputs is not None else 1
        corrections = []
        with job.capture(modules, grab):
            for i in range(full):
                out = job.forward_batch(i)
                if dense_outputs is not None:
                    # the dense model's block output minus this block's: the FFN is asked to make up for the
                    # pruned attention and for the error carried in from earlier blocks
                    delta = dense_outputs[i].to(out.device) - out
                    corrections.append(delta.reshape(-1, delta.shape[-1]).to(storage, torch.float32))
        same_input = not captured["gate"] or torch.equal(captured["gate"][0], captured["up"][0])
        for i in range(full, len(job.inputs)):
            x = job.input_of(i, [job.linears[n] for n in (gate, up) if n is not None])
            captured["up"].append(x.reshape(-1, x.shape[-1]).to(storage, torch.float32))
        X = self._rechunk(torch.cat(captured["up"]))
        first_output = captured["down"][0]
        Y = self._rechunk(torch.cat(captured["down"])) if full == len(job.inputs) else None
        del captured

        w_up = read_weight(job.linears[up], device)
        w_gate = read_weight(job.linears[gate], device) if gate is not None else None
        w_in = torch.cat([w_gate, w_up]) if gate is not None else w_up
        b_in = self._bias(job.linears[up], device, job.linears[gate] if gate is not None else None)
        w_down = read_weight(job.linears[down], device)
        b_down = self._bias(job.linears[down], device)
        problem = FFNProblem(X, Y, w_in, b_in, w_down, b_down, act, gated)
        matches = same_input and self._formula_matches(problem, first_output, device)
        if all_reduce_scalar(0.0 if matches else 1.0) > 0:  # every rank takes the same branch
            logger.warning("Block %d: FFN output does not match the %s layout; pruning it with SparseGPT.",
                           job.index, "gated" if gated else "plain")
            job.prune_locally(self.local, names=[n for n in (gate, up, down) if n is not None])
            return
        if corrections:
            problem.targets = [y + c for y, c in zip(Y, self._rechunk(torch.cat(corrections)))]
        del corrections

        in_names = [gate, up] if gate is not None else [up]
        rows = [w.shape[0] for w in ([w_gate, w_up] if gate is not None else [w_up])]

        def sgpt(weight, hessian, name, factor=None):
            sparsity = job.sparsity_for(job.full_name(name))
            return sparsegpt_prune(weight, hessian, sparsity, layer_nm(cfg.nm, sparsity), cfg.block_size,
                                   cfg.damping, factor=factor)

        input_factor = []  # XᵀX never changes: factor it once for every input-side prune

        def prune_in(weight, hessian):
            if not input_factor:
                input_factor.append(sparsegpt_factor(hessian, cfg.damping))
            parts, masks, start = [], [], 0
            for name, r in zip(in_names, rows):
                w, m = sgpt(weight[start : start + r], hessian, name, input_factor[0])
                parts.append(w)
                masks.append(m)
                start += r
            return torch.cat(parts), torch.cat(masks)

        result = solve_ffn(
            problem, prune_in, lambda w, h: sgpt(w, h, down), device, storage,
            iterations=opts.iterations, alpha=opts.alpha, beta=opts.beta, gamma=opts.gamma,
            newton_steps=opts.newton_steps, refit_down=opts.refit_down, damping=cfg.damping,
            reduce_sum=all_reduce_sum, reduce_scalar=all_reduce_scalar,
        )
        start = 0
        for name, r in zip(in_names, rows):
            original = w_in[start : start + r]
            job.apply_weight(name, original, result.w_in[start : start + r], result.mask_in[start : start + r])
            start += r
        job.apply_weight(down, w_down, result.w_down, result.mask_down)
        job.diagnostics["ffn_error_sparsegpt"] = result.sparsegpt_error
        job.diagnostics["ffn_error"] = result.error
        job.diagnostics["ffn_error_history"] = result.history
        job.diagnostics["ffn_best"] = result.best
        logger.info("Block %d FFN: relative output error %.5f (SparseGPT start %.5f, %s).",
                    job.index, result.error, result.sparsegpt_error, result.best)

    def _storage_device(self, job, device: torch.device, mlp=None) -> torch.device:
        if self.options.activation_device is not None:
            return torch.device(self.options.activation_device)
        if device.type != "cuda":
            return device
        down = job.linears[(mlp or job.spec.mlp).down]
        mlp_width = down.weight.shape[-1]
        need = 4 * job.inputs.num_tokens * (3 * mlp_width + 2 * down.weight.shape[0])
        free, _ = torch.cuda.mem_get_info(device)
        return device if need < free / 4 else torch.device("cpu")

    def _rechunk(self, t: torch.Tensor) -> list:
        return list(torch.split(t, self.options.chunk_tokens))

    @staticmethod
    def _bias(module, device, gate_module=None):
        """Bias of `module` (float32), with the gate's bias first for separate gate/up linears; `None` if none."""
        mods = ([gate_module] if gate_module is not None else []) + [module]
        if all(getattr(m, "bias", None) is None for m in mods):
            return None
        parts = []
        for m in mods:
            out = read_weight(m, device).shape[0]
            b = getattr(m, "bias", None)
            parts.append(b.detach().to(device, torch.float32) if b is not None else torch.zeros(out, device=device))
        return torch.cat(parts)

    @staticmethod
    def _formula_matches(problem: FFNProblem, first_output: torch.Tensor, device) -> bool:
        rows = min(64, first_output.shape[0])
        x = problem.inputs[0][:rows].to(device)
        y = first_output[:rows].to(device)
        pred = _linear(_ffn_inner(_linear(x, problem.w_in, problem.b_in), problem.act, problem.gated), problem.w_down, problem.b_down)
        return bool(torch.isfinite(pred).all()) and float((pred - y).norm()) <= 1e-3 * max(float(y.norm()), 1e-6) + 1e-5
