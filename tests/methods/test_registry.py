"""The method registry refuses a second class under a taken name (issue 20: it used to overwrite silently)."""

import pytest

from optimum_sparse.methods import PruningMethod, available_methods, get_method_class, register_method
from optimum_sparse.methods.sparsegpt import SparseGPTPruning


def test_register_method_refuses_a_duplicate_name():
    class Impostor(PruningMethod):
        name = "sparsegpt"

    with pytest.raises(ValueError, match="already registered.*SparseGPTPruning"):
        register_method(Impostor)
    assert get_method_class("sparsegpt") is SparseGPTPruning


def test_register_method_again_with_the_same_class_is_a_no_op():
    before = available_methods()
    assert register_method(SparseGPTPruning) is SparseGPTPruning
    assert available_methods() == before and get_method_class("sparsegpt") is SparseGPTPruning


def test_register_method_needs_a_name():
    class Nameless(PruningMethod):
        name = ""

    with pytest.raises(ValueError, match="non-empty"):
        register_method(Nameless)


def test_whole_model_is_a_capability_flag():
    from optimum_sparse.methods.elsa import ELSAPruning

    assert ELSAPruning.whole_model is True and ELSAPruning.runs_whole_model()
    assert not SparseGPTPruning.runs_whole_model()

    class OwnLoop(PruningMethod):  # a method written before the flag: overriding prune_model still counts
        name = "own-loop-test"

        def prune_model(self, *args, **kwargs):
            raise NotImplementedError

    assert OwnLoop.runs_whole_model()
    OwnLoop.whole_model = False
    assert not OwnLoop.runs_whole_model()
