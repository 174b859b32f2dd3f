"""Typed options of methods and allocators (peft-style dataclasses: fields with defaults and `metadata["help"]`).

A method declares `options_class = MyOptions` (an `Options` subclass); `PruningConfig.method_kwargs` (and
`allocation_kwargs` for allocators) accepts either the dataclass or the plain dict of its keys, and stores the dict of
the keys that differ from their defaults, so `pruning_config.json` keeps its format. Unknown keys raise one clear
`ValueError` when the config is built, before any model is touched. The CLI makes one flag of each field
(`optimum_sparse.cli.schema`), and the card's reproduce command is written from the same fields.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

__all__ = ["Options", "NoOptions", "WithOptions", "option", "option_fields", "OptionField"]


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           key: Optional[str] = None, choices: Optional[tuple] = None, cli: bool = True):
    """A dataclass field of an `Options` class.

    Args:
        default / default_factory: as in `dataclasses.field`.
        help (`str`): one line shown by `--help` and in the docs.
        key (`str`, *optional*): the dict key when it is not a Python name (OWL's `"lambda"`).
        choices (`tuple`, *optional*): allowed values (checked, and the CLI flag's choices).
        cli (`bool`): whether the field gets a CLI flag (dict-valued fields are given through the JSON flag).
    """
    metadata = {"help": help, "key": key, "choices": choices, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionField:
    """One field of an `Options` class as the CLI and the docs see it."""

    name: str  # the Python attribute
    key: str  # the key in `method_kwargs` / `allocation_kwargs`
    type: Any  # the resolved annotation
    default: Any
    help: str
    choices: Optional[tuple]
    cli: bool


@dataclass
class Options:
    """Base class of the option dataclasses.

    Subclasses are `@dataclass`es whose fields use `option(...)`, set `label` (the name in messages) and may override
    `check(config)` for range and cross-field checks (raise `ValueError` naming the key).
    """

    label: ClassVar[str] = ""
    kind: ClassVar[str] = "method_kwargs"  # the PruningConfig field holding the dict form

    @classmethod
    def fields(cls) -> list[OptionField]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(OptionField(f.name, f.metadata.get("key") or f.name, hints[f.name], default,
                                   f.metadata.get("help", ""), f.metadata.get("choices"), f.metadata.get("cli", True)))
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """`{key: default}` for every field."""
        return {f.key: f.default for f in cls.fields()}

    @classmethod
    def from_kwargs(cls, kwargs: Any, owner: str) -> "Options":
        """The options of `kwargs` (a dict of keys, or an instance of this class); unknown keys raise `ValueError`.

        `owner` names the method or allocator in the message (`"method 'alps'"`).
        """
        if isinstance(kwargs, Options):
            if not isinstance(kwargs, cls):
                raise ValueError(f"PruningConfig.{cls.kind}: {type(kwargs).__name__} given for {owner}, which takes "
                                 f"{cls.__name__} (or a dict of its keys).")
            return kwargs
        if not isinstance(kwargs, dict):
            raise ValueError(f"PruningConfig.{cls.kind} must be a dict or a {cls.__name__}, got {kwargs!r}.")
        names = {f.key: f.name for f in cls.fields()}
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            label = f" (unknown {cls.label} parameters)" if cls.label else ""
            raise ValueError(f"PruningConfig.{cls.kind}: unknown keys {unknown} for {owner}{label}; "
                             f"allowed: {sorted(names)}.")
        return cls(**{names[k]: v for k, v in kwargs.items()})

    def to_dict(self) -> dict[str, Any]:
        """`{key: value}` for every field (defaults included)."""
        return {f.key: getattr(self, f.name) for f in self.fields()}

    def to_kwargs(self) -> dict[str, Any]:
        """The dict form kept in `PruningConfig`: the keys whose value differs from the default."""
        return {f.key: getattr(self, f.name) for f in self.fields() if getattr(self, f.name) != f.default}

    def check(self, config: Any) -> None:
        """Raises `ValueError` for a value out of range; the default checks the `choices` of each field."""
        for f in self.fields():
            value = getattr(self, f.name)
            if f.choices is not None and value not in f.choices:
                raise ValueError(f"PruningConfig.{self.kind}[{f.key!r}] must be one of {list(f.choices)}, "
                                 f"got {value!r}.")


@dataclass
class NoOptions(Options):
    """The options of a method or allocator that takes none: any key is refused."""


class WithOptions:
    """Mixin of methods and allocators: `options_class` built from the config field `options_field` (lazily, as
    `self.options`; `self.config` is the `PruningConfig`)."""

    name: ClassVar[str] = ""
    options_class: ClassVar[type[Options]] = NoOptions
    options_field: ClassVar[str] = "method_kwargs"  # or "allocation_kwargs"
    options_owner: ClassVar[str] = "method {!r}"  # how messages name the owner, formatted with `name`

    @classmethod
    def option_classes(cls) -> tuple:
        """Every options class this method or allocator takes, by kind of run (the CLI makes flags of them all);
        `options_from_config` picks the one of a config."""
        return (cls.options_class,)

    @classmethod
    def options_from_config(cls, config: Any) -> Options:
        """`options_class` from the config's dict (or dataclass); unknown keys raise `ValueError`."""
        return cls.options_class.from_kwargs(getattr(config, cls.options_field), cls.options_owner.format(cls.name))

    @functools.cached_property
    def options(self) -> Options:
        """The parameters (`options_class` from the config), built on first use."""
        return self.options_from_config(self.config)


def option_fields(options_class: Optional[type]) -> list[OptionField]:
    """The fields of an options class (`[]` for `None`)."""
    return options_class.fields() if options_class is not None else []
