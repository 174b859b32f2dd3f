"""The structured search's settings as an options dataclass (`StructuredSearchOptions`, issue 20): the same defaults
as the hand-written dict they replace, the dict form still accepted, unknown keys and bad values refused when the
config is built, and the CLI flags, the config and the card's reproduce command generated from the one dataclass."""

import copy
import json

import pytest

from optimum_sparse import PruningConfig
from optimum_sparse.allocation import SEARCH_DEFAULTS, SearchOptions, StructuredSearchOptions, get_allocator
from optimum_sparse.hub.card import reproduce_commands
from optimum_sparse.schema import config_to_cli_args, option_flags
from optimum_sparse.serialization import PruningRecord
from optimum_sparse.structured.search import STRUCTURED_SEARCH_DEFAULTS, validate_structured_search
from optimum_sparse.structured.uniform_search import check_uniform_search_kwargs

from ..test_cli_config_card import config_from_command, prune_parser

# the literal `STRUCTURED_SEARCH_DEFAULTS` of commit 512b989 (SEARCH_DEFAULTS with these keys changed or added)
OLD_DEFAULTS = {**SEARCH_DEFAULTS, "step": 0.1, "max_sparsity": 1.0, "budget": "params", "latency_table": None,
                "latency_repeats": 5}


def structured(**allocation_kwargs):
    return PruningConfig(method="structprune", structure="channels+heads", sparsity=0.3, allocation="search",
                         allocation_kwargs=allocation_kwargs)


def test_same_defaults_and_keys_as_the_dict_they_replace():
    assert STRUCTURED_SEARCH_DEFAULTS == OLD_DEFAULTS == StructuredSearchOptions().to_dict()
    assert list(STRUCTURED_SEARCH_DEFAULTS) == list(OLD_DEFAULTS)  # the order the search info is written in
    assert validate_structured_search(structured()) == OLD_DEFAULTS
    assert validate_structured_search(structured(levels=3, budget="latency")) == {**OLD_DEFAULTS, "levels": 3,
                                                                                  "budget": "latency"}


def test_dataclass_and_dict_forms():
    config = PruningConfig(method="structprune", structure="heads", sparsity=0.3, allocation="search",
                           allocation_kwargs=StructuredSearchOptions(generations=3, budget="latency", step=0.1))
    assert config.allocation_kwargs == {"generations": 3, "budget": "latency"}  # the non-default keys, as a dict
    assert get_allocator("search")(config).options == StructuredSearchOptions(generations=3, budget="latency")
    assert structured(generations=3, step=0.1).allocation_kwargs == {"generations": 3, "step": 0.1}  # dict kept as is
    with pytest.raises(ValueError, match="StructuredSearchOptions given for allocation='search', which takes "
                                         "SearchOptions"):
        PruningConfig(method="sparsegpt", allocation="search", allocation_kwargs=StructuredSearchOptions())
    assert isinstance(get_allocator("search")(PruningConfig(allocation="search")).options, SearchOptions)


@pytest.mark.parametrize("kwargs, match", [
    ({"bogus": 1}, r"unknown keys \['bogus'\] for allocation='search' with structure='channels\+heads'"),
    ({"budget": "time"}, r"\['budget'\] must be one of \['params', 'latency'\]"),
    ({"latency_table": {}}, "needs budget='latency'"),
    ({"latency_repeats": 0}, "latency_repeats"),
    ({"init": "owl"}, r"\['init'\] must be one of \['uniform', 'method', 'threshold', 'softmax'\]"),
    ({"max_sparsity": 1.5}, "max_sparsity"),
])
def test_bad_settings_are_refused_when_the_config_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        structured(**kwargs)


def test_uniform_shapes_reads_its_settings_from_the_dataclass():
    config = PruningConfig(method="structprune", structure="channels+heads", sparsity=0.3, allocation="search",
                           uniform_shapes=True, allocation_kwargs={"fitness": "hidden", "search_samples": 4})
    kw = check_uniform_search_kwargs(config)
    assert kw == {**OLD_DEFAULTS, "fitness": "hidden", "search_samples": 4}
    with pytest.raises(ValueError, match="do not apply to allocation='search' with uniform_shapes=True"):
        PruningConfig(method="structprune", structure="channels+heads", sparsity=0.3, allocation="search",
                      uniform_shapes=True, allocation_kwargs={"levels": 3})


def test_every_structured_setting_has_a_flag_from_the_dataclass():
    _, prune = prune_parser()
    actions = {s: a for a in prune._actions for s in a.option_strings}
    flags = {o.field.key: o for o in option_flags() if o.owner == "search"}
    for field in StructuredSearchOptions.fields():
        flag = f"--search-{field.key.replace('_', '-')}"
        assert flag in actions and actions[flag].help, flag
        assert flags[field.key].flag == flag
    assert actions["--search-budget"].choices == ["params", "latency"]
    assert "structured search: 0.1" in actions["--search-step"].help  # both defaults named


def test_config_flags_and_card_agree(tmp_path):
    table = tmp_path / "latency.json"
    table.write_text(json.dumps({}))
    config = structured(init="method", step=0.2, levels=3, budget="latency", latency_table=str(table),
                        latency_repeats=7, max_sparsity=0.9, generations=0, state_dir=str(tmp_path / "state"))
    _, command = reproduce_commands(PruningRecord(config=copy.deepcopy(config)), "org/model")
    for flag in ("--search-budget latency", "--search-latency-repeats 7", "--search-step 0.2", "--search-init method",
                 f"--search-latency-table {table}"):
        assert flag in command
    assert "--allocation-kwargs" not in command  # every structured setting went out as its own flag
    assert config_from_command(command).to_dict() == config.to_dict()
    typed = config_from_command("optimum-sparse prune --model m --method structprune --structure heads --sparsity 0.3 "
                                "--allocation search --search-budget latency --search-latency-repeats 3")
    assert typed.allocation_kwargs == {"budget": "latency", "latency_repeats": 3}
    assert validate_structured_search(typed) == {**OLD_DEFAULTS, "budget": "latency", "latency_repeats": 3}
    assert [["--search-budget", "latency"], ["--search-latency-repeats", "3"]] == [
        a for a in config_to_cli_args(typed) if a[0].startswith("--search")]


def test_a_fixed_structured_search_gives_the_weights_of_before():
    """A tiny structured search (StructPrune, channels+heads, 30%) hashed at commit 512b989, before its settings became
    a dataclass: the pruned weights and the search's recorded settings are bit for bit the same (one thread)."""
    import hashlib

    import torch

    from optimum_sparse import SparsePruner

    from ..helpers import make_ids, make_model, requires_pinned_platform

    requires_pinned_platform()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model("llama")
        config = PruningConfig(method="structprune", sparsity=0.3, structure="channels+heads", num_samples=8,
                               seq_len=16, batch_size=4, allocation="search",
                               allocation_kwargs=dict(generations=2, rounds=1, offspring=4, survivors=2, levels=1))
        pruner = SparsePruner(config)
        pruner.apply(model, dataset=make_ids(8, 16), progress=False)
    finally:
        torch.set_num_threads(threads)
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().float().contiguous().numpy().tobytes())
    info = {k: v for k, v in pruner.report.allocation["info"].items() if k not in ("seconds", "disk_bytes", "history")}
    assert info["levels"] == 1 and info["budget"] == "params"
    h.update(json.dumps(info, sort_keys=True, default=str).encode())
    assert h.hexdigest() == "24e27fc84776df93e01dbee56495fa7f255677a959e0ae71398e2a8d509066d3"
