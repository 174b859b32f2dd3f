"""One report class from the engine to `pruning_report.json` (issue 20)."""

import json

import torch

from optimum_sparse import PruningConfig, PruningRecord, PruningReport, SparsePruner
from optimum_sparse.report import LayerReport
from optimum_sparse.serialization import PruningRecord as SerializationRecord

from .helpers import make_ids, make_model


def test_the_record_is_the_report():
    assert PruningRecord is PruningReport and SerializationRecord is PruningReport


def test_a_run_gives_one_object_with_the_engine_and_run_fields():
    model = make_model("llama")
    pruner = SparsePruner(PruningConfig(method="wanda", sparsity=0.5, num_samples=4, seq_len=16))
    pruner.apply(model, dataset=make_ids(4, 16), progress=False)
    assert pruner.report is pruner.record
    data = pruner.record.to_dict()
    assert data["method"] == "wanda" and data["config"]["sparsity"] == 0.5
    assert data["calibration"]["num_samples"] == 4 and data["layers"] and data["inventory"]["sparsity"] > 0.49
    again = PruningReport.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data


def test_an_engine_report_without_config_round_trips_without_run_fields():
    report = PruningReport(method="magnitude", layers=[LayerReport("l", (4, 8), 0.5, None, {"x": 1})], seconds=1.5)
    data = report.to_dict()
    assert "config" not in data and "format_version" not in data and data["mean_sparsity"] == 0.5
    again = PruningReport.from_dict(data)
    assert again.config is None and again.to_dict() == data
    config = PruningConfig(method="magnitude", sparsity=0.5)
    saved = PruningReport.from_run(config, report, input_ids=torch.zeros(2, 3, dtype=torch.long))
    assert saved.config is config and saved.calibration["seq_len"] == 3 and report.config is None
