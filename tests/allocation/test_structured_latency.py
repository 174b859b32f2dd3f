"""The latency budget of the structured search: Σ module latency never above the start allocation's (injected,
deterministic tables; the measured path only checked for its invariant and its records, never for timing values)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from optimum_sparse import PruningConfig, SparsePruner
from optimum_sparse.methods import get_method_class
from optimum_sparse.structured import latency as latency_module
from optimum_sparse.structured.latency import LatencyTable
from optimum_sparse.structured.runner import plan_structured
from optimum_sparse.structured.search import StructuredSupernet, _StructuredSearch, structured_search

from ..helpers import assert_state_unchanged, make_ids, make_model, snapshot

SMALL = {"generations": 4, "rounds": 2, "offspring": 6, "survivors": 2, "levels": 2}


def _config(sparsity=0.3, structure="channels+heads", **kwargs):
    return PruningConfig(method="structprune", sparsity=sparsity, structure=structure, num_samples=8, seq_len=16,
                         batch_size=4, allocation="search", allocation_kwargs={**SMALL, "budget": "latency", **kwargs})


def _table(plan, head=1.0, channel=0.05):
    """Deterministic latencies, linear in the kept groups: heads `head` s/group, channels `channel` s/channel."""
    return {name: {k: (head if m.key[1] == "heads" else channel) * k for k in m.options()}
            for name, m in zip(plan.module_names(), plan.modules)}


def _removed(modules, kept):
    return sum((m.groups - k) * m.cost for m, k in zip(modules, kept))


def test_latency_moves_never_exceed_the_budget_and_trade_kinds():
    model = make_model("llama", num_layers=4)
    config = _config()
    plan = plan_structured(model, config)
    table = LatencyTable(plan, _table(plan, head=1.0, channel=1 / 16), batch=1, seq_len=4, repeats=1)
    start = [m.groups if m.key[1] == "heads" else 32 for m in plan.modules]  # heads dense, half the channels
    net = StructuredSupernet.__new__(StructuredSupernet)
    net.centres, net.levels = start, 2
    net.steps = [m.step for m in plan.modules]
    net.kmin, net.kmax = [m.options()[0] for m in plan.modules], [m.groups for m in plan.modules]
    net.options = [frozenset(m.options()) for m in plan.modules]
    search = SimpleNamespace(latency=table, kw={"max_flips": 3}, latency_budget=lambda: table.total(start))
    rng = random.Random(0)
    genome, traded = [0] * len(start), 0
    for _ in range(300):
        child = _StructuredSearch.mutate(search, genome, rng, net)
        kept = [net.count(g, lv) for g, lv in enumerate(child)]
        assert table.total(kept) <= table.total(start)
        assert all(k in m.options() for k, m in zip(kept, plan.modules))
        kinds = {plan.modules[g].key[1] for g, (a, b) in enumerate(zip(genome, child)) if a != b}
        traded += len(kinds) == 2
        genome = child
    assert traded  # moves trade heads against channels


def test_search_under_an_injected_latency_table(tmp_path):
    model = make_model("llama", num_layers=3)
    before = snapshot(model)
    config = _config(state_dir=str(tmp_path / "s"))
    plan = plan_structured(model, config)
    config.allocation_kwargs["latency_table"] = _table(plan)
    alloc = structured_search(model, plan, get_method_class("structprune")(config), config, make_ids(),
                              progress=False)
    assert_state_unchanged(model, before)
    lat = alloc.info["latency"]
    kept = [alloc.info["structured"]["kept_groups"][n] for n in plan.module_names()]
    start = [alloc.info["structured"]["start_kept_groups"][n] for n in plan.module_names()]
    table = config.allocation_kwargs["latency_table"]
    achieved = sum(table[n][k] for n, k in zip(plan.module_names(), kept))
    budget = sum(table[n][k] for n, k in zip(plan.module_names(), start))
    assert lat["source"] == "given" and lat["measured"] == {}
    assert lat["achieved_latency"] == pytest.approx(achieved) and lat["start_latency"] == pytest.approx(budget)
    assert achieved <= budget + 1e-12
    assert alloc.info["budget"] == "latency" and "latency_table" not in alloc.info
    for entry in alloc.info["history"]:
        assert entry["fitness"] <= entry["parent_fitness"]  # elitist under the latency budget too
    assert set(lat["per_module"]) == set(plan.module_names())


def test_latency_search_through_the_pruner_and_the_card():
    from optimum_sparse.hub.card import build_model_card

    model = make_model("llama", num_layers=3)
    plan = plan_structured(model, _config())
    pruner = SparsePruner(_config(latency_table={n: {str(k): v for k, v in row.items()}  # JSON-style keys
                                                 for n, row in _table(plan).items()}))
    pruner.apply(model, dataset=make_ids(), progress=False)
    info = pruner.allocation.info
    assert info["latency"]["achieved_latency"] <= info["latency"]["start_latency"] + 1e-12
    kept = info["structured"]["kept_groups"]
    for i, layer in enumerate(model.model.layers):  # the model was shrunk to the searched sizes
        assert layer.mlp.down_proj.weight.shape[1] == kept[f"model.layers.{i}.channels"]
    text = str(build_model_card(pruner.record))
    assert "latency budget" in text


def test_measured_latency_is_recorded_and_reused_on_resume(tmp_path, monkeypatch):
    model = make_model("llama", num_layers=2)
    config = _config(state_dir=str(tmp_path / "s"), latency_repeats=1, generations=2, rounds=1)
    plan = plan_structured(model, config)
    method = get_method_class("structprune")(config)
    assert structured_search(model, plan, method, config, make_ids(), progress=False, stop_after=1) is None
    assert (tmp_path / "s" / "latency.json").is_file()
    saved = json.loads((tmp_path / "s" / "latency.json").read_text())
    assert saved and all(v >= 0 for v in saved.values())

    calls = []
    real = latency_module.time_module
    monkeypatch.setattr(latency_module, "time_module", lambda *a, **k: calls.append(a) or real(*a, **k))
    alloc = structured_search(model, plan, method, config, make_ids(), progress=False)
    lat = alloc.info["latency"]
    assert lat["source"] == "measured" and lat["repeats"] == 1 and lat["batch"] == [4, 16]
    assert lat["achieved_latency"] <= lat["start_latency"]
    start = alloc.info["structured"]["start_kept_groups"]
    for name, k in start.items():  # the start sizes were measured in the first call and reused
        assert k in lat["measured"][name]
    assert len(calls) <= len(json.loads((tmp_path / "s" / "latency.json").read_text())) - len(saved)


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": "flops"}, r"allocation_kwargs\['budget'\] must be one of \['params', 'latency'\]"),
    ({"budget": "params", "latency_table": {}}, "needs budget='latency'"),
    ({"latency_repeats": 0}, "latency_repeats"),
    ({"latency_table": {"model.layers.0.heads": {"x": 1.0}}}, "is not an integer"),
    ({"latency_table": {"model.layers.0.heads": {"1": -1.0}}}, "seconds >= 0"),
])
def test_bad_latency_settings_fail_at_config_time(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


def test_incomplete_table_refused_before_any_change():
    model = make_model("llama")
    before = snapshot(model)
    pruner = SparsePruner(_config(latency_table={"model.layers.0.heads": {"1": 1.0, "2": 2.0}}))
    with pytest.raises(ValueError, match="latency_table has no time for model.layers.0.channels"):
        pruner.apply(model, dataset=make_ids(), progress=False)
    assert_state_unchanged(model, before)


def test_unstructured_search_has_no_latency_budget():
    with pytest.raises(ValueError, match="unknown keys"):
        PruningConfig(method="wanda", sparsity=0.5, allocation="search", allocation_kwargs={"budget": "latency"})
