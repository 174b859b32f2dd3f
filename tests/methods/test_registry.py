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


def test_capabilities_are_flags_not_overrides():
    from optimum_sparse.methods.elsa import ELSAPruning

    flags = {name: (get_method_class(name).whole_model, get_method_class(name).per_linear,
                    get_method_class(name).structured) for name in available_methods()}
    assert flags["elsa"] == (True, False, False)
    assert flags["sparsellm"] == flags["alps"] == (False, False, False)
    assert flags["sparsegpt"] == flags["wanda"] == flags["magnitude"] == (False, True, False)
    assert {n for n, f in flags.items() if f[2]} == {"structprune", "flap", "wanda-structured", "magnitude-structured",
                                                     "expert-removal", "expert-channels"}
    assert ELSAPruning.runs_whole_model() and not SparseGPTPruning.runs_whole_model()

    class OwnLoop(PruningMethod):  # overriding prune_model or prune_block says nothing: only the flags do
        name = "own-loop-test"

        def prune_model(self, *args, **kwargs):
            raise NotImplementedError

        def prune_block(self, job):
            raise NotImplementedError

    assert not OwnLoop.runs_whole_model() and OwnLoop.per_linear


def test_the_pruner_shards_by_the_flag(monkeypatch):
    """Two ranks: a block-wise method gets its rank's share of the windows, a whole-model method all of them."""
    import torch

    from optimum_sparse import PruningConfig, SparsePruner
    from optimum_sparse import pruner as pruner_module
    from tests.helpers import make_model

    seen = {}

    class Recorder(SparseGPTPruning):
        def prune_model(self, model, input_ids, *args, **kwargs):
            seen[type(self).whole_model] = input_ids.shape[0]
            return super().prune_model(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(pruner_module, "shard_rows", lambda ids: ids[: ids.shape[0] // 2])
    ids = torch.randint(0, 100, (8, 16))
    for whole in (False, True):
        Recorder.whole_model = whole
        pruner = SparsePruner(PruningConfig(num_samples=8, seq_len=16, batch_size=4))
        pruner.method = Recorder(pruner.config)
        pruner.apply(make_model("llama"), dataset=ids, progress=False)
    assert seen == {False: 4, True: 8}


def test_the_search_refuses_a_method_that_is_not_per_linear():
    from optimum_sparse import PruningConfig

    with pytest.raises(ValueError, match="prunes blocks jointly"):
        PruningConfig(method="sparsellm", allocation="search")
    PruningConfig(method="sparsegpt", allocation="search")
