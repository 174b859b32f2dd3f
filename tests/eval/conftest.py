"""Fixtures of the evaluation tests."""

import urllib.error

import pytest


@pytest.fixture
def hub_unreachable(monkeypatch):
    """No Hub: the reachability probe fails (no offline variable set); returns the list of probe timeouts."""
    from optimum_sparse.eval import accuracy

    calls = []

    def unreachable(request, timeout):
        calls.append(timeout)
        raise urllib.error.URLError("no route to host")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(accuracy.urllib.request, "urlopen", unreachable)
    return calls


@pytest.fixture(scope="module")
def wiki():
    """The bundled Wikipedia splits `(calibration, evaluation)`; skips when the asset is not installed."""
    from optimum_sparse.data.wiki import wiki_offline_path, wiki_offline_texts

    try:
        wiki_offline_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return wiki_offline_texts("calibration"), wiki_offline_texts("evaluation")
