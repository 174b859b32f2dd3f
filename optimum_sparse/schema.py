"""One schema for `PruningConfig`, the `optimum-sparse prune` flags and the card's reproduce command.

The flags are generated from the dataclasses: one per `PruningConfig` field (`num_samples` -> `--num-samples`, help
from `metadata["help"]`), and one per scalar field of each method's and allocator's `Options`
(`ALPSOptions.rho` -> `--alps-rho`, `OWLOptions` key `lambda` -> `--owl-lambda`). The reproduce command is written
from the same fields (`config_to_cli_args`), so parsing it rebuilds the config (tests/test_cli_config_card.py).
Option fields without a flag (dicts such as `warm_start_kwargs`) go through `--method-kwargs` / `--allocation-kwargs`
JSON, which the typed option flags override key by key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Optional

from .allocation import available_allocators, get_allocator
from .config import CLI_FIELDS, EXPERT_FALLBACKS, EXPERT_STATISTICS, PruningConfig, cli_flag
from .config import config_to_cli_args as _field_args
from .methods import available_methods, get_method_class
from .options import OptionField

__all__ = ["add_config_arguments", "option_flags", "config_from_args", "config_to_cli_args", "OptionFlag"]

_KWARGS = {"method_kwargs": ("method", get_method_class, available_methods),
           "allocation_kwargs": ("allocation", get_allocator, available_allocators)}
_CHOICES = {"expert_statistics": EXPERT_STATISTICS, "expert_fallback": EXPERT_FALLBACKS}
_DEST = "option:{}:{}:{}"  # argparse dest of an option flag: kwargs field, owner, key


def _bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _json_dict(value: str) -> dict:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def _json_or_path(value: Optional[str]):
    """A JSON object given inline (`'{...}'`), else the string itself (a path, read by `PruningConfig`)."""
    return json.loads(value) if value is not None and value.lstrip().startswith("{") else value


def _scalar(annotation: Any) -> Optional[type]:
    """`int`, `float`, `str` or `bool` for a (possibly `Optional`) scalar annotation, else `None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (int, float, str, bool) else None


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class OptionFlag:
    """The flag of one option field: `--alps-rho` sets `method_kwargs["rho"]` when `--method alps`."""

    kwargs_field: str  # "method_kwargs" or "allocation_kwargs"
    owner: str  # the method or allocator name
    field: OptionField
    type: type

    @property
    def flag(self) -> str:
        return f"--{self.owner}-{self.field.key.replace('_', '-')}"

    @property
    def dest(self) -> str:
        return _DEST.format(self.kwargs_field, self.owner, self.field.key)


def option_flags() -> list[OptionFlag]:
    """Every option flag: each scalar field of each registered method's and allocator's options.

    An owner with several options classes by kind of run (the search: `SearchOptions`, `StructuredSearchOptions`)
    gets one flag per key; where the classes' help or defaults differ, the help names each (`default: 0.05;
    structured search: 0.1`)."""
    out = []
    for kwargs_field, (_, get, available) in _KWARGS.items():
        for owner in available():
            flags: dict = {}
            for options_class in get(owner).option_classes():
                for field in options_class.fields():
                    kind = _scalar(field.type)
                    if not field.cli or kind is None:
                        continue
                    if field.key not in flags:
                        flags[field.key] = OptionFlag(kwargs_field, owner, field, kind)
                        continue
                    first = flags[field.key].field
                    help = first.help
                    if field.help != first.help:
                        help += f" {options_class.label.capitalize()}: {field.help}"
                    if field.default != first.default:
                        help += f" (default: {_fmt(first.default)}; {options_class.label}: {_fmt(field.default)})"
                    flags[field.key] = OptionFlag(kwargs_field, owner, dataclasses.replace(first, help=help), kind)
            out.extend(flags.values())
    return out


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per `PruningConfig` field (`CLI_FIELDS`) and one per option field (`option_flags`)."""
    hints = typing.get_type_hints(PruningConfig)
    for f in dataclasses.fields(PruningConfig):
        if f.name not in CLI_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict = {"help": f.metadata.get("help", ""), "default": default, "dest": f.name}
        kind = _scalar(hints[f.name])
        if f.name in _KWARGS:
            kwargs.update(type=_json_dict, default=json.dumps(default))
            kwargs["help"] += " (JSON; typed flags below override its keys)"
        elif f.name == "layer_sparsity":
            kwargs["type"] = _json_or_path
        elif kind is bool:
            kwargs["action"] = "store_true"
        elif kind is not None:
            kwargs["type"] = kind
        elif typing.get_origin(hints[f.name]) is list or hints[f.name] is list:
            kwargs["nargs"] = "+" if default else "*"
        choices = _CHOICES.get(f.name) or ({"method": available_methods, "allocation": available_allocators}
                                           .get(f.name, lambda: None)())
        if choices:
            kwargs["choices"] = list(choices)
        parser.add_argument(cli_flag(f.name), **kwargs)
    groups: dict = {}
    for option in option_flags():
        owner_field = _KWARGS[option.kwargs_field][0]
        if option.owner not in groups:
            groups[option.owner] = parser.add_argument_group(
                f"--{owner_field.replace('_', '-')} {option.owner}",
                f"{option.kwargs_field} of {owner_field}={option.owner!r} (default: the option's default)")
        extra = ({"nargs": "?", "const": True, "metavar": "{true,false}"} if option.type is bool else
                 {"metavar": option.type.__name__.upper()})
        if option.field.choices:
            extra.update(choices=list(option.field.choices), metavar=None)
        help = option.field.help
        if "default" not in help:
            help += f" (default: {_fmt(option.field.default)})"
        groups[option.owner].add_argument(option.flag, dest=option.dest, default=argparse.SUPPRESS, help=help,
                                          type=_bool if option.type is bool else option.type, **extra)


def typed_options(args: argparse.Namespace, config: dict) -> dict:
    """`{kwargs field: {key: value}}` of the option flags typed on the command line; a flag of another method or
    allocator than the config's raises `ValueError`."""
    out: dict = {name: {} for name in _KWARGS}
    for option in option_flags():
        if not hasattr(args, option.dest):
            continue
        owner_field = _KWARGS[option.kwargs_field][0]
        if config.get(owner_field) != option.owner:
            raise ValueError(f"{option.flag} is a parameter of --{owner_field.replace('_', '-')} {option.owner}, "
                             f"not of {config.get(owner_field)!r}.")
        out[option.kwargs_field][option.field.key] = getattr(args, option.dest)
    return out


def config_from_args(args: argparse.Namespace, given: Optional[set] = None,
                     base: Optional[dict] = None) -> PruningConfig:
    """The `PruningConfig` of parsed `optimum-sparse prune` arguments.

    With `base` (a saved config's dict), only the fields in `given` (the flags typed, also at their defaults)
    override it; the typed option flags override the keys of `method_kwargs` / `allocation_kwargs`.
    """
    values = {name: getattr(args, name) for name in CLI_FIELDS}
    config = dict(values) if base is None else {**base, **{k: v for k, v in values.items() if k in (given or ())}}
    if base is not None and given is not None and "structure" in given and "sparsity" not in given:
        config.pop("sparsity", None)  # a new structure: the file's sparsity (its N/M) is not a choice of the user
    for name, typed in typed_options(args, config).items():
        if typed:
            config[name] = {**config.get(name, {}), **typed}
    return PruningConfig.from_dict(config) if base is not None else PruningConfig(**config)


def config_to_cli_args(config: PruningConfig, always: tuple = ()) -> list:
    """The `optimum-sparse prune` arguments that rebuild `config`: one `[flag, *values]` per field that differs from
    its default (and per field in `always`), then one per option key that has a flag (`--alps-rho 0.2`); option keys
    without a flag stay in `--method-kwargs` / `--allocation-kwargs` JSON."""
    out = _field_args(config, always, skip=tuple(_KWARGS))
    flags = {(o.kwargs_field, o.owner, o.field.key): o for o in option_flags()}
    for name, (owner_field, _, _) in _KWARGS.items():
        owner, rest = getattr(config, owner_field), {}
        for key, value in getattr(config, name).items():
            option = flags.get((name, owner, key))
            if option is not None and value is not None:
                out.append([option.flag, _fmt(value)])
            else:
                rest[key] = value
        if rest:
            out.append([cli_flag(name), json.dumps(rest, sort_keys=True)])
    return out
