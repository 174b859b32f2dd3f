"""One schema for PruningConfig, the `optimum-sparse prune` flags and the card's reproduce command (issue 20): the
parser has a flag for every config field and every option of every method and allocator (generated from the
dataclasses), the reproduce command is generated from the same fields, and parsing the generated command rebuilds
the config exactly; a flag typed at its default still overrides `--config`."""

import copy
import dataclasses
import json
import shlex

import pytest

from optimum_sparse import PruningConfig
from optimum_sparse.cli import main as cli
from optimum_sparse.config import CLI_FIELDS, cli_flag
from optimum_sparse.methods import available_methods
from optimum_sparse.schema import config_to_cli_args, option_flags, typed_options
from optimum_sparse.hub.card import reproduce_commands
from optimum_sparse.serialization import PruningRecord


def prune_parser():
    parser = cli.build_parser()
    return parser, next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["prune"]


def config_from_command(command: str) -> PruningConfig:
    """What `optimum-sparse prune` builds from a reproduce command (without loading any model)."""
    argv = shlex.split(command.replace("\\\n", " "))[1:]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    return cli.prune_config(args)


def test_every_config_field_has_a_prune_flag_with_the_config_default():
    _, prune = prune_parser()
    by_dest = {a.dest: a for a in prune._actions}
    defaults = PruningConfig()
    assert set(CLI_FIELDS) == {f.name for f in dataclasses.fields(PruningConfig)} - {"library_version"}
    for name in CLI_FIELDS:
        assert name in by_dest, f"no {cli_flag(name)} flag for PruningConfig.{name}"
        assert cli_flag(name) in by_dest[name].option_strings
        default = by_dest[name].default
        if name in ("method_kwargs", "allocation_kwargs"):
            default = json.loads(default)
        assert default == getattr(defaults, name), f"{cli_flag(name)} default {default!r} != config default"


CONFIGS = [
    PruningConfig(),
    PruningConfig(method="wanda", structure="2:4", dataset="my data.txt", ignore=["re:.*down_proj"],
                  true_sequential=True, targets=["Linear"], damping=0.05, block_size=64, seed=3),
    PruningConfig(method="structprune", sparsity=0.3, structure="channels+heads", multiple_of=16,
                  method_kwargs={"allocation": "uniform"}, num_samples=16, seq_len=256, batch_size=2),
    PruningConfig(method="sparsegpt", sparsity=0.6, allocation="owl", allocation_kwargs={"M": 5},
                  layer_sparsity={"model.layers.0.mlp.down_proj": 0.5}, device="cpu", expert_statistics="pooled",
                  min_expert_tokens=4, expert_fallback="magnitude"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_the_card_reproduce_command_rebuilds_the_config(config):
    record = PruningRecord(config=copy.deepcopy(config))
    _, with_flags = reproduce_commands(record, "org/model")
    rebuilt = config_from_command(with_flags)
    assert rebuilt.to_dict() == config.to_dict()
    for arg in config_to_cli_args(config):  # every non-default field is in the command
        assert arg[0] in with_flags


def test_reproduce_names_the_flags_it_used_to_drop():
    config = PruningConfig(method="structprune", sparsity=0.3, structure="channels", multiple_of=16,
                           targets=["Linear"], damping=0.02, block_size=32)
    _, with_flags = reproduce_commands(PruningRecord(config=config), "m")
    for flag in ("--multiple-of 16", "--targets Linear", "--damping 0.02", "--block-size 32"):
        assert flag in with_flags


def test_a_flag_at_its_default_overrides_the_config_file(tmp_path):
    PruningConfig(method="wanda", structure="2:4", damping=0.05, seq_len=256).save_pretrained(tmp_path)
    base = f"optimum-sparse prune --model x --config {tmp_path}"

    kept = config_from_command(base)
    assert (kept.method, kept.structure, kept.damping, kept.seq_len) == ("wanda", "2:4", 0.05, 256)
    # --damping 0.01 and --structure unstructured are the defaults: typed, they still override the file
    changed = config_from_command(base + " --damping 0.01 --structure unstructured --seq-len 2048")
    assert (changed.method, changed.structure, changed.damping, changed.seq_len) == ("wanda", "unstructured", 0.01, 2048)
    assert changed.sparsity == PruningConfig().sparsity  # the file's 2:4 sparsity is not kept for a new structure


def _other_value(option):
    """A valid-typed value different from the option's default."""
    default, kind = option.field.default, option.type
    if option.field.choices:
        return next(c for c in option.field.choices if c != default)
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 3
    if kind is float:
        return (default or 0.125) * 1.5
    return f"{default or 'x'}-other"


def test_every_option_field_has_a_flag_with_help():
    _, prune = prune_parser()
    flags = {s: a for a in prune._actions for s in a.option_strings}
    seen = set()
    for option in option_flags():
        assert option.flag in flags and flags[option.flag].help, option.flag
        seen.add(option.owner)
    # every method with scalar options has flags (ELSA, ALPS, SparseLLM, the structured methods), OWL and search too
    assert {"alps", "elsa", "sparsellm", "structprune", "flap", "owl", "search"} <= seen
    assert "--alps-rho" in flags and "--owl-lambda" in flags and "--structprune-admm-iters" in flags


@pytest.mark.parametrize("owner", sorted({o.owner for o in option_flags()}))
def test_the_reproduce_command_carries_every_option_as_its_flag(owner):
    """Every option set to a non-default value is written as its flag and parsed back to the same key and value."""
    options = [o for o in option_flags() if o.owner == owner]
    kwargs_field = options[0].kwargs_field
    config = PruningConfig()
    setattr(config, kwargs_field, {o.field.key: _other_value(o) for o in options})  # the flags, not the checks
    setattr(config, "method" if kwargs_field == "method_kwargs" else "allocation", owner)
    argv = ["prune", "--model", "m"] + [part for arg in config_to_cli_args(config) for part in arg]
    assert f"--{kwargs_field.replace('_', '-')}" not in argv  # nothing left for the JSON flag
    args = cli.build_parser().parse_args(argv)
    assert typed_options(args, {"method": config.method, "allocation": config.allocation})[kwargs_field] == \
        getattr(config, kwargs_field)


def test_method_options_as_flags_build_the_config():
    config = config_from_command("optimum-sparse prune --model m --method sparsellm --sparsellm-iterations 4 "
                                 "--sparsellm-refit-down false --method-kwargs '{\"alpha\": 2.0, \"iterations\": 9}'")
    assert config.method_kwargs == {"alpha": 2.0, "iterations": 4, "refit_down": False}  # flags override the JSON
    with_alps = config_from_command("optimum-sparse prune --model m --method alps --alps-rho 0.3 "
                                    "--alps-warm-start sparsellm --method-kwargs '{\"warm_start_kwargs\": "
                                    "{\"iterations\": 2}}' --allocation owl --owl-lambda 0.1")
    assert with_alps.method_kwargs == {"rho": 0.3, "warm_start": "sparsellm", "warm_start_kwargs": {"iterations": 2}}
    assert with_alps.allocation_kwargs == {"lambda": 0.1}
    _, with_flags = reproduce_commands(PruningRecord(config=with_alps), "m")
    assert "--alps-rho 0.3" in with_flags and "--owl-lambda 0.1" in with_flags
    assert config_from_command(with_flags).to_dict() == with_alps.to_dict()
    with pytest.raises(ValueError, match="--alps-rho is a parameter of --method alps, not of 'sparsegpt'"):
        config_from_command("optimum-sparse prune --model m --alps-rho 0.3")


def test_an_option_flag_overrides_the_config_file(tmp_path):
    PruningConfig(method="sparsellm", method_kwargs={"iterations": 3, "alpha": 2.0}).save_pretrained(tmp_path)
    config = config_from_command(f"optimum-sparse prune --model x --config {tmp_path} --sparsellm-iterations 1")
    assert config.method_kwargs == {"iterations": 1, "alpha": 2.0}  # typed at its default, it still overrides


def test_every_method_is_covered_by_the_schema():
    with_options = {o.owner for o in option_flags() if o.kwargs_field == "method_kwargs"}
    from optimum_sparse.methods import get_method_class

    for name in available_methods():
        fields = get_method_class(name).options_class.fields()
        assert (name in with_options) == any(f.cli for f in fields), name
