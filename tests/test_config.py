"""PruningConfig: validation messages, N:M handling and serialization round trips."""

import json
import logging

import pytest

from optimum_sparse import PruningConfig, available_methods
from optimum_sparse.config import CONFIG_NAME, parse_structure


def test_defaults_are_valid():
    config = PruningConfig()
    assert config.method in available_methods()
    assert config.structure == "unstructured" and config.nm is None
    assert 0.0 <= config.sparsity < 1.0


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", None, True])
def test_sparsity_outside_range_names_field_and_range(sparsity):
    with pytest.raises(ValueError, match=r"PruningConfig\.sparsity.*\[0, 1\)"):
        PruningConfig(sparsity=sparsity)


@pytest.mark.parametrize("sparsity", [0, 0.0, 0.5, 0.999])
def test_sparsity_in_range_accepted_as_float(sparsity):
    config = PruningConfig(sparsity=sparsity)
    assert isinstance(config.sparsity, float) and config.sparsity == sparsity


@pytest.mark.parametrize("structure", ["4:4", "5:4", "0:4", "2:0"])
def test_nm_needs_n_below_m(structure):
    with pytest.raises(ValueError, match=r"PruningConfig\.structure.*0 < N < M"):
        PruningConfig(structure=structure)


@pytest.mark.parametrize("structure", ["2-4", "2:4:8", "a:b", "", "2 : 4", "structured", "-1:4"])
def test_malformed_structure_lists_allowed_values(structure):
    with pytest.raises(ValueError, match=r"PruningConfig\.structure must be 'unstructured' or 'N:M'"):
        PruningConfig(structure=structure)


@pytest.mark.parametrize("structure,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4), ("3:8", 3, 8)])
def test_nm_sets_sparsity_to_n_over_m(structure, n, m):
    with pytest.raises(ValueError, match="contradicts"):  # N:M prunes N/M: another sparsity is refused (issue 18)
        PruningConfig(structure=structure, sparsity=0.9)
    config = PruningConfig(structure=structure)
    assert config.nm == (n, m)
    assert config.sparsity == pytest.approx(n / m)
    assert parse_structure(structure) == (n, m)
    assert parse_structure("unstructured") is None


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match=r"PruningConfig\.method must be one of") as info:
        PruningConfig(method="no-such-method")
    for name in ("magnitude", "wanda", "sparsegpt"):
        assert name in str(info.value)


@pytest.mark.parametrize("field", ["targets", "ignore"])
def test_bad_regex_names_field(field):
    with pytest.raises(ValueError, match=rf"PruningConfig\.{field}: invalid regex"):
        PruningConfig(**{field: ["re:mlp.(down"]})


@pytest.mark.parametrize("field", ["targets", "ignore"])
@pytest.mark.parametrize("value", [[1], ["Linear", None], 3])
def test_non_string_patterns_rejected(field, value):
    with pytest.raises(ValueError, match=rf"PruningConfig\.{field} must be a list of strings"):
        PruningConfig(**{field: value})


def test_string_pattern_promoted_to_list():
    config = PruningConfig(targets="mlp.down_proj", ignore="re:layers\\.0\\.")
    assert config.targets == ["mlp.down_proj"] and config.ignore == ["re:layers\\.0\\."]


def test_empty_targets_rejected():
    with pytest.raises(ValueError, match=r"PruningConfig\.targets"):
        PruningConfig(targets=[])


@pytest.mark.parametrize("field", ["num_samples", "seq_len", "block_size", "batch_size"])
@pytest.mark.parametrize("value", [0, -3, 2.5, "8", True])
def test_non_positive_ints_name_field(field, value):
    with pytest.raises(ValueError, match=rf"PruningConfig\.{field} must be a positive integer"):
        PruningConfig(**{field: value})


@pytest.mark.parametrize("damping", [0, -0.01, "0.01", True, float("nan")])
def test_damping_must_be_positive(damping):
    with pytest.raises(ValueError, match=r"PruningConfig\.damping"):
        PruningConfig(damping=damping)


@pytest.mark.parametrize("seed", ["0", 1.5, None, True])
def test_seed_must_be_int(seed):
    with pytest.raises(ValueError, match=r"PruningConfig\.seed must be an integer"):
        PruningConfig(seed=seed)


@pytest.mark.parametrize("value", ["no", "false", 0, None])
def test_true_sequential_must_be_bool(value):
    with pytest.raises(ValueError, match=r"PruningConfig\.true_sequential must be True or False"):
        PruningConfig(true_sequential=value)


def test_block_size_must_divide_by_m():
    with pytest.raises(ValueError, match=r"PruningConfig\.block_size.*M=8"):
        PruningConfig(method="sparsegpt", structure="4:8", block_size=12)
    assert PruningConfig(method="sparsegpt", structure="4:8", block_size=16).block_size == 16


def test_bad_device_rejected():
    with pytest.raises(ValueError, match=r"PruningConfig\.device"):
        PruningConfig(device="not-a-device")


def test_method_kwargs_must_be_dict():
    with pytest.raises(ValueError, match=r"PruningConfig\.method_kwargs"):
        PruningConfig(method_kwargs=[("a", 1)])


def _custom_config():
    return PruningConfig(
        method="alps", structure="4:8", dataset="data/calib.jsonl", num_samples=16, seq_len=64, seed=7,
        targets=["Linear", "re:mlp\\."], ignore=["o_proj"], damping=0.05, block_size=64, true_sequential=True,
        batch_size=2, device="cpu",
        method_kwargs={"rho": 1.5, "warm_start": "sparsellm", "warm_start_kwargs": {"iterations": 2}},
    )


def test_dict_round_trip():
    config = _custom_config()
    data = config.to_dict()
    assert data["method"] == "alps" and data["sparsity"] == 0.5 and data["structure"] == "4:8"
    again = PruningConfig.from_dict(data)
    assert again == config
    assert again.to_dict() == data


def test_json_string_is_valid_json():
    config = _custom_config()
    assert json.loads(config.to_json_string()) == config.to_dict()


def test_save_and_load_pretrained(tmp_path):
    config = _custom_config()
    config.save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / CONFIG_NAME
    assert path.is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [CONFIG_NAME]  # no temporary file left behind
    assert PruningConfig.from_pretrained(tmp_path / "out") == config
    assert PruningConfig.from_pretrained(str(path)) == config
    assert PruningConfig.from_json_file(path) == config


def test_from_pretrained_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PruningConfig.from_pretrained(tmp_path)


def test_unknown_keys_dropped_with_warning(caplog):
    data = PruningConfig(method="magnitude", sparsity=0.6).to_dict()
    data["future_option"] = 3
    data["another"] = "x"
    with caplog.at_level(logging.WARNING, logger="optimum_sparse"):
        config = PruningConfig.from_dict(data)
    assert config.method == "magnitude" and config.sparsity == 0.6
    assert not hasattr(config, "future_option")
    assert "future_option" in caplog.text and "another" in caplog.text


def test_invalid_values_rejected_on_load(tmp_path):
    path = tmp_path / CONFIG_NAME
    data = PruningConfig().to_dict()
    data["sparsity"] = 1.2
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"PruningConfig\.sparsity"):
        PruningConfig.from_pretrained(path)
