"""`PruningConfig`: the one validated, serializable description of a pruning run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from .options import Options
from .version import __version__

__all__ = ["PruningConfig", "CONFIG_NAME", "parse_structure", "STRUCTURED", "EXPERT_STATISTICS", "EXPERT_FALLBACKS",
           "register_config_check", "CLI_FIELDS", "cli_flag", "config_to_cli_args"]

EXPERT_STATISTICS = ("routed", "pooled")
EXPERT_FALLBACKS = ("mean-hessian", "damping", "magnitude")

# Checks that need a registry (method names and options, allocators) live with that registry and register here, so
# the config stays plain data and imports none of them (tests/test_import_layering.py). Run in this order.
CONFIG_CHECKS = ("method", "method_options", "allocation")
_CHECKS: dict[str, Callable[["PruningConfig"], None]] = {}


def register_config_check(stage: str, check: Callable[["PruningConfig"], None]) -> None:
    """Registers the check `PruningConfig.__post_init__` runs at `stage` (one of `CONFIG_CHECKS`); one per stage."""
    if stage not in CONFIG_CHECKS:
        raise ValueError(f"Unknown config check stage {stage!r}; expected one of {CONFIG_CHECKS}.")
    if stage in _CHECKS and _CHECKS[stage] is not check:
        raise ValueError(f"A config check for stage {stage!r} is already registered ({_CHECKS[stage]!r}).")
    _CHECKS[stage] = check


def _run_check(stage: str, config: "PruningConfig") -> None:
    check = _CHECKS.get(stage)
    if check is None:  # only possible when the package's registries failed to import
        raise RuntimeError(f"No PruningConfig check registered for {stage!r}; import optimum_sparse, not config alone.")
    check(config)

logger = logging.getLogger(__name__)

CONFIG_NAME = "pruning_config.json"
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")
# structured pruning: whole MLP channels and/or attention heads (KV groups), or whole experts removed; the model shrinks
STRUCTURED = ("channels", "heads", "channels+heads", "experts", "expert-channels")


_DEFAULT_SPARSITY = 0.5


def parse_structure(structure: str) -> Optional[tuple[int, int]]:
    """Returns `(n, m)` for an N:M structure string such as `"2:4"`, or `None` for `"unstructured"` and the
    structured kinds (`"channels"`, `"heads"`, `"channels+heads"`).

    `n` is the number of zeros in every group of `m` consecutive input weights.
    """
    if structure == "unstructured" or structure in STRUCTURED:
        return None
    match = _NM_PATTERN.match(structure) if isinstance(structure, str) else None
    if match is None:
        raise ValueError(
            f"PruningConfig.structure must be 'unstructured' or 'N:M' (e.g. '2:4', '4:8') or a structured kind "
            f"({', '.join(repr(s) for s in STRUCTURED)}), got {structure!r}."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"PruningConfig.structure {structure!r}: N:M needs 0 < N < M, got N={n}, M={m}.")
    return n, m


def _help(text: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    kwargs = {"metadata": {"help": text}}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, **kwargs)
    return field(default=default, **kwargs)


@dataclass
class PruningConfig:
    """Configuration of a post-training pruning run.

    The config is validated on construction; every error names the field and the allowed values.
    It round-trips through `to_dict`/`from_dict` and JSON (`save_pretrained`/`from_pretrained`).

    Args:
        method (`str`, defaults to `"sparsegpt"`):
            Pruning method, one of `optimum_sparse.available_methods()` (`"magnitude"`, `"wanda"`, `"sparsegpt"`, ...).
        sparsity (`float`, defaults to `0.5`):
            Fraction of weights set to zero in every pruned linear layer, in `[0, 1)`. N:M structures prune `N/M`:
            leave `sparsity` at its default (or set it to `N/M`); another value (e.g. `"2:4"` with `0.7`) is refused. For structured pruning: the fraction of the prunable block parameters removed
            (the linears of the pruned structure kinds: attention q/k/v/o for heads, the MLP for channels).
        structure (`str`, defaults to `"unstructured"`):
            `"unstructured"` or `"N:M"` (e.g. `"2:4"`): exactly N zeros in every M consecutive input weights.
            `"channels"`, `"heads"` or `"channels+heads"`: structured pruning with a structured method
            (`"structprune"`, `"flap"`, `"wanda-structured"`, `"magnitude-structured"`): whole MLP channels and/or
            attention heads (under GQA whole KV groups with their query heads) are removed and the linears shrink;
            see docs/structured.md. `"experts"` with method `"expert-removal"`: whole experts of every MoE block are
            removed (`sparsity` is then the fraction of experts removed per block); `"expert-channels"` with method
            `"expert-channels"`: the same fraction of intermediate channels removed from every routed expert; see
            docs/moe.md.
        dataset (`str`, defaults to `"wiki-offline"`):
            Calibration source when `SparsePruner.apply` gets no `dataset`: `"wiki-offline"` (bundled Wikipedia
            text), `"wikitext2"`, `"c4"`, `"ptb"`, any `datasets` name, or a local `.txt`/`.jsonl` file.
        num_samples (`int`, defaults to `128`): Number of calibration sequences.
        seq_len (`int`, defaults to `2048`): Tokens per calibration sequence.
        seed (`int`, defaults to `0`): Seed of the calibration sampling.
        targets (`list[str]`, defaults to `["Linear", "Conv1D"]`):
            Modules to prune inside the decoder blocks: class names (`"Linear"`, `"Conv1D"`), module-name suffixes
            (`"mlp.down_proj"`), or regexes prefixed with `re:`.
        ignore (`list[str]`, defaults to `[]`):
            Modules to skip, same grammar as `targets`. Embeddings and `lm_head` are never pruned.
        damping (`float`, defaults to `0.01`): Relative Hessian damping (fraction of the mean diagonal).
        block_size (`int`, defaults to `128`): Column block size of the SparseGPT solver.
        true_sequential (`bool`, defaults to `False`):
            Within a block, prune the linear groups in order (attention inputs, attention output, MLP inputs, MLP
            output), recollecting statistics after each group. Slower, usually a little better.
        batch_size (`int`, defaults to `8`): Calibration sequences forwarded at once through a block.
        device (`str`, *optional*):
            Device for statistics and solves (`"cuda"`, `"cpu"`). Defaults to the device of each block's weights,
            or CUDA when the model sits on the CPU and a GPU is available.
        method_kwargs (`dict` or the method's `Options` dataclass, defaults to `{}`):
            The method's parameters: its options dataclass (e.g. `ALPSOptions(rho=0.2)`, see
            `get_method_class(method).options_class`) or the dict of its keys; kept as the dict of the keys that differ
            from their defaults. Unknown keys are refused.
        allocation (`str`, defaults to `"uniform"`):
            How the global sparsity is split over the pruned linears: `"uniform"`, `"owl"` (outlier-weighted) or
            `"search"` (Týr-style evolutionary search). Every allocation prunes exactly `sparsity` of the pruned
            layers' parameters (N:M structures: per-layer patterns `N_i:M` pruning exactly the uniform N:M count).
            See `docs/allocation.md`. Structured runs take `"uniform"` (the method's own rule,
            `method_kwargs["allocation"]`) or `"search"` (kept heads/channels per block searched, docs/structured.md).
        allocation_kwargs (`dict` or the allocator's `Options` dataclass, defaults to `{}`):
            Allocator parameters (`get_allocator(allocation).options_class`): OWL's `M` and `lambda`; the search's settings (`optimum_sparse.allocation.SEARCH_DEFAULTS`;
            structured runs: `optimum_sparse.allocation.search.StructuredSearchOptions`, with `budget="latency"`).
        layer_sparsity (`dict` or `str`, *optional*):
            Per-layer override, `{full module name: sparsity}` or the path of a JSON file holding one; unlisted layers
            share the rest of the budget (N:M: multiples of `1/M`). Loaded into a dict on construction.
        multiple_of (`int`, defaults to `8`):
            Structured pruning only: kept MLP channels per layer are a multiple of this (64 or 128 suit GPUs).
        uniform_shapes (`bool`, defaults to `False`):
            Structured pruning only: every block keeps the same numbers of KV groups/heads and MLP channels, so the
            stock config describes the model and it loads without `trust_remote_code` (transformers, vLLM, llama.cpp
            converters). The allocation rule decides how many of each kind to remove, pooled over the blocks. See
            docs/structured.md.
        expert_statistics (`str`, defaults to `"routed"`):
            Mixture-of-experts models: each expert's statistics from the tokens the router sends to it, weighted by
            the routing weight (`"routed"`), or from all tokens, unweighted (`"pooled"`). See docs/moe.md.
        min_expert_tokens (`int`, *optional*):
            Experts routed fewer calibration tokens than this get `expert_fallback` (default: the expert's input
            width, below which `XᵀX` is rank deficient). At least 1: an expert without tokens always gets it.
        expert_fallback (`str`, defaults to `"mean-hessian"`):
            Statistics of under-calibrated experts: `"mean-hessian"` (blend with the mean of the block's experts by
            the token deficit), `"damping"` (damping scaled with the token deficit) or `"magnitude"` (prune the expert
            by magnitude). Recorded per expert in the report.
    """

    method: str = _help("Pruning method name.", "sparsegpt")
    sparsity: float = _help("Fraction of the pruned layers' weights set to zero, in [0, 1) (N:M: leave it, N/M is "
                            "used; structure=experts: the fraction of experts removed per block).", _DEFAULT_SPARSITY)
    structure: str = _help("'unstructured', N:M (e.g. 2:4: N zeros in each M consecutive input weights), or "
                           "structured: 'channels', 'heads', 'channels+heads' (with structprune, flap, "
                           "wanda-structured or magnitude-structured), 'experts' (with expert-removal).", "unstructured")
    dataset: str = _help("Calibration source (name, .txt/.jsonl path) when none is passed to apply().", "wiki-offline")
    num_samples: int = _help("Number of calibration sequences.", 128)
    seq_len: int = _help("Tokens per calibration sequence.", 2048)
    seed: int = _help("Seed of the calibration window sampling.", 0)
    targets: list = _help("Modules to prune (class names, name suffixes, or 're:' regexes).", default_factory=lambda: ["Linear", "Conv1D"])
    ignore: list = _help("Modules to skip (same grammar as targets).", default_factory=list)
    damping: float = _help("Relative Hessian damping.", 0.01)
    block_size: int = _help("Column block size of the OBS solver.", 128)
    true_sequential: bool = _help("Recollect statistics after each linear group (q/k/v, o, gate/up, down) is pruned.", False)
    batch_size: int = _help("Calibration sequences forwarded at once through a block.", 8)
    device: Optional[str] = _help("Device for statistics and solves (cuda, cpu).", None)
    method_kwargs: dict = _help("The method's parameters (its options dataclass or a dict of its keys).", default_factory=dict)
    allocation: str = _help("Layer-wise sparsity allocation (docs/allocation.md): 'uniform', 'owl' or 'search'; "
                            "structured methods: 'uniform' (their own rule, method_kwargs allocation) or "
                            "'search' (kept heads/channels searched).", "uniform")
    allocation_kwargs: dict = _help("Allocator parameters (OWL M/lambda, search settings such as state_dir; structured "
                                    "search: budget 'params' or 'latency').", default_factory=dict)
    layer_sparsity: Optional[Any] = _help("Per-layer sparsity override: a JSON dict {module: sparsity} or the path of a "
                                          "JSON file (N:M: multiples of 1/M, e.g. 0.75 = 3:4 under 2:4).", None)
    library_version: str = _help("optimum-sparse version that wrote this config.", __version__)
    multiple_of: int = _help("Structured pruning: kept MLP channels per layer are a multiple of this (64/128 for "
                             "GPUs).", 8)
    uniform_shapes: bool = _help("Structured pruning: every block keeps the same head and channel counts (stock "
                                 "config, loads without trust_remote_code).", False)
    expert_statistics: str = _help("MoE: per-expert statistics from 'routed' tokens (routing-weighted) or 'pooled'.",
                                   "routed")
    min_expert_tokens: Optional[int] = _help("MoE: experts with fewer routed tokens get expert_fallback "
                                             "(default: the input width).", None)
    expert_fallback: str = _help("MoE: 'mean-hessian', 'damping' or 'magnitude' for under-calibrated experts.",
                                 "mean-hessian")

    def __post_init__(self):
        _run_check("method", self)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"PruningConfig.sparsity must be a float in [0, 1), got {self.sparsity!r}.")
        self.sparsity = float(self.sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"PruningConfig.sparsity must be in [0, 1), got {self.sparsity}.")
        nm = parse_structure(self.structure)
        if nm is not None:
            if self.sparsity not in (_DEFAULT_SPARSITY, nm[0] / nm[1]):
                raise ValueError(
                    f"PruningConfig.sparsity={self.sparsity:g} contradicts structure={self.structure!r}, whose sparsity is "
                    f"N/M = {nm[0] / nm[1]:g}: leave sparsity at its default or set it to {nm[0] / nm[1]:g} (or use "
                    "structure='unstructured' for another fraction, or layer_sparsity/allocation for per-layer N_i:M)."
                )
            self.sparsity = nm[0] / nm[1]
        for name in ("num_samples", "seq_len", "block_size", "batch_size", "multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PruningConfig.{name} must be a positive integer, got {value!r}.")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping > 0:
            raise ValueError(f"PruningConfig.damping must be a positive float, got {self.damping!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"PruningConfig.seed must be an integer, got {self.seed!r}.")
        if not isinstance(self.true_sequential, bool):
            raise ValueError(f"PruningConfig.true_sequential must be True or False, got {self.true_sequential!r}.")
        if not isinstance(self.uniform_shapes, bool):
            raise ValueError(f"PruningConfig.uniform_shapes must be True or False, got {self.uniform_shapes!r}.")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
                setattr(self, name, value)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"PruningConfig.{name} must be a list of strings, got {value!r}.")
            for pattern in value:
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as err:
                        raise ValueError(f"PruningConfig.{name}: invalid regex {pattern!r}: {err}") from err
        if not self.targets:
            raise ValueError("PruningConfig.targets must name at least one module class, name or 're:' regex.")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"PruningConfig.device: {err}") from err
        self._validate_experts()
        if not isinstance(self.method_kwargs, (dict, Options)):
            raise ValueError(f"PruningConfig.method_kwargs must be a dict or the method's options dataclass, "
                             f"got {self.method_kwargs!r}.")
        _run_check("method_options", self)
        if self.is_structured and (self.allocation not in ("uniform", "search") or self.layer_sparsity):
            raise ValueError(
                f"PruningConfig.allocation={self.allocation!r} / layer_sparsity apply to unstructured and N:M runs; "
                "structured methods allocate through method_kwargs['allocation'] ('uniform', 'threshold', "
                "'softmax') or PruningConfig.allocation='search'."
            )
        if self.uniform_shapes and (not self.is_structured or self.structure == "experts"):
            raise ValueError(f"PruningConfig.uniform_shapes=True applies to structured pruning (structure 'channels', "
                             f"'heads' or 'channels+heads'), got structure={self.structure!r}.")
        _run_check("allocation", self)

    def _validate_experts(self) -> None:
        if self.expert_statistics not in EXPERT_STATISTICS:
            raise ValueError(f"PruningConfig.expert_statistics must be one of {list(EXPERT_STATISTICS)}, "
                             f"got {self.expert_statistics!r}.")
        if self.expert_fallback not in EXPERT_FALLBACKS:
            raise ValueError(f"PruningConfig.expert_fallback must be one of {list(EXPERT_FALLBACKS)}, "
                             f"got {self.expert_fallback!r}.")
        value = self.min_expert_tokens
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"PruningConfig.min_expert_tokens must be None or an integer >= 1, got {value!r}.")

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        """`(n, m)` for N:M structures, else `None`."""
        return parse_structure(self.structure)

    @property
    def is_structured(self) -> bool:
        """Whether whole channels/heads/experts are removed (`structure` in `"channels"`, `"heads"`, `"channels+heads"`,
        `"experts"`)."""
        return self.structure in STRUCTURED

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "PruningConfig":
        """Builds a config from a dict; unknown keys are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            logger.warning("Ignoring unknown PruningConfig keys: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in config_dict.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: Union[str, os.PathLike]) -> None:
        """Writes the config as JSON, atomically (temporary file, then rename)."""
        from .utils import atomic_write_text

        atomic_write_text(path, self.to_json_string())

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "PruningConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Saves the config as `pruning_config.json` in `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **kwargs) -> "PruningConfig":
        """Loads a config from a folder holding `pruning_config.json`, a JSON file, or a Hub repo id."""
        path = os.fspath(path)
        if os.path.isdir(path):
            file = os.path.join(path, CONFIG_NAME)
        elif os.path.isfile(path):
            file = path
        else:
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(path, CONFIG_NAME, **kwargs)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {path}.")
        return cls.from_json_file(file)


# ----- the CLI view of the config (one source for `optimum-sparse prune` and the card's reproduce command) -----------
# Every field is a `--flag` of `optimum-sparse prune` named after it (`num_samples` -> `--num-samples`), except the
# version stamp. tests/test_cli_config_card.py checks the parser and the card against this list.
CLI_FIELDS = tuple(f.name for f in dataclasses.fields(PruningConfig) if f.name != "library_version")


def cli_flag(name: str) -> str:
    """`--num-samples` for the field `num_samples`."""
    return "--" + name.replace("_", "-")


def config_to_cli_args(config: PruningConfig, always: tuple = (), skip: tuple = ()) -> list:
    """The `optimum-sparse prune` arguments of the `PruningConfig` fields of `config`: one `[flag, *values]` per field
    that differs from its default (and per field in `always`), in field order, but the fields in `skip`. Dicts are
    JSON; lists take several values. `optimum_sparse.schema.config_to_cli_args` adds the typed option flags."""
    defaults = PruningConfig()
    out = []
    for name in CLI_FIELDS:
        if name in skip:
            continue
        value = getattr(config, name)
        if name not in always and value == getattr(defaults, name):
            continue
        flag = cli_flag(name)
        if isinstance(value, bool):
            if value:
                out.append([flag])
            continue  # False is the default of every boolean field
        if isinstance(value, dict):
            out.append([flag, json.dumps(value, sort_keys=True)])
        elif isinstance(value, (list, tuple)):
            out.append([flag, *[str(v) for v in value]])
        elif isinstance(value, float):
            out.append([flag, f"{value:g}" if float(f"{value:g}") == value else repr(value)])
        elif value is not None:
            out.append([flag, str(value)])
    return out
