"""Per-method and per-allocator option dataclasses (issue 20): typed fields with help and defaults, registered with
the method; the old dict form of `method_kwargs` / `allocation_kwargs` is accepted and stored as before."""

import dataclasses
import json

import pytest

from optimum_sparse import ALPSOptions, PruningConfig, SparseLLMOptions, StructPruneOptions
from optimum_sparse.allocation import SEARCH_DEFAULTS, get_allocator
from optimum_sparse.allocation.base import Allocator, register_allocator
from optimum_sparse.allocation.owl import OWLOptions
from optimum_sparse.methods import available_methods, get_method_class
from optimum_sparse.options import NoOptions, Options


@pytest.mark.parametrize("name", available_methods())
def test_every_method_has_an_options_dataclass_with_help(name):
    cls = get_method_class(name).options_class
    assert issubclass(cls, Options) and dataclasses.is_dataclass(cls)
    for field in cls.fields():
        assert field.help, f"{cls.__name__}.{field.name} has no help"
    cls()  # every field has a default


def test_dataclass_and_dict_forms_build_the_same_config():
    typed = PruningConfig(method="alps", method_kwargs=ALPSOptions(rho=0.2, max_iterations=50))
    plain = PruningConfig(method="alps", method_kwargs={"rho": 0.2, "max_iterations": 50})
    assert typed == plain and typed.method_kwargs == {"rho": 0.2, "max_iterations": 50}
    assert json.loads(typed.to_json_string())["method_kwargs"] == {"rho": 0.2, "max_iterations": 50}
    # defaults are not written: the saved format is the dict a user would have written
    assert PruningConfig(method="sparsellm", method_kwargs=SparseLLMOptions()).method_kwargs == {}


def test_the_method_reads_its_options_as_a_dataclass():
    method_cls = get_method_class("sparsellm")
    method = method_cls(PruningConfig(method="sparsellm", method_kwargs={"iterations": 3, "ffn_target": "dense_model"}))
    assert isinstance(method.options, SparseLLMOptions)
    assert (method.options.iterations, method.options.ffn_target, method.options.alpha) == (3, "dense_model", 1.0)


def test_an_old_pruning_config_json_loads(tmp_path):
    old = {"method": "structprune", "sparsity": 0.3, "structure": "channels", "method_kwargs": {"allocation": "uniform",
           "rho": 0.5}, "allocation": "uniform", "allocation_kwargs": {}, "library_version": "0.1.0", "num_samples": 8}
    (tmp_path / "pruning_config.json").write_text(json.dumps(old))
    config = PruningConfig.from_pretrained(tmp_path)
    assert config.method_kwargs == {"allocation": "uniform", "rho": 0.5}
    method = get_method_class("structprune")(config)
    assert isinstance(method.options, StructPruneOptions) and method.options.rho == 0.5
    assert method.allocation == "uniform" and method.options.admm_iters == 30


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="wanda", method_kwargs={"alpha": 1}), r"unknown keys \['alpha'\] for method 'wanda'; allowed: \[\]"),
    (dict(method="alps", method_kwargs=SparseLLMOptions()), "SparseLLMOptions given for method 'alps'"),
    (dict(method="alps", method_kwargs={"rho": -1}), r"method_kwargs\['rho'\] must be a positive number"),
    (dict(method="structprune", structure="heads", method_kwargs=StructPruneOptions(admm_iters=0)), "admm_iters"),
    (dict(method="sparsellm", method_kwargs=SparseLLMOptions(ffn_target="x")), "ffn_target"),
    (dict(allocation="owl", allocation_kwargs=OWLOptions(lambda_=1.5)), r"allocation_kwargs\['lambda'\]"),
    (dict(allocation="owl", allocation_kwargs={"lambda_": 0.1}), r"unknown keys \['lambda_'\]"),
    (dict(allocation="uniform", allocation_kwargs={"M": 5}), r"unknown keys \['M'\] for allocation='uniform'"),
    (dict(method_kwargs="rho=1"), r"PruningConfig\.method_kwargs must be a dict"),
])
def test_bad_options_are_refused_when_the_config_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**kwargs)


def test_allocator_options():
    owl = PruningConfig(allocation="owl", allocation_kwargs=OWLOptions(M=7, lambda_=0.1))
    assert owl.allocation_kwargs == {"M": 7, "lambda": 0.1}  # `lambda` is not a Python name: the key is kept
    assert get_allocator("owl")(owl).options.lambda_ == 0.1
    search = get_allocator("search").options_class
    assert SEARCH_DEFAULTS == search().to_dict() and SEARCH_DEFAULTS["max_sparsity"] == 0.95
    assert PruningConfig(allocation="search", allocation_kwargs=search(generations=3)).allocation_kwargs == {
        "generations": 3}
    with pytest.raises(ValueError, match="SearchOptions given for allocation='search' with structure='heads', which "
                                         "takes StructuredSearchOptions"):
        PruningConfig(method="structprune", structure="heads", allocation="search", allocation_kwargs=search())


def test_allocator_names_are_not_taken_twice():
    class Taken(Allocator):
        name = "owl"

    with pytest.raises(ValueError, match="already registered"):
        register_allocator(Taken)
    assert get_allocator("owl") is not Taken
    assert get_allocator("uniform").options_class is NoOptions
