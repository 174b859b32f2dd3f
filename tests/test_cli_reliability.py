"""`optimum-sparse prune` never loses work: the destination is checked before the model is loaded (issue 18.4/18.6)."""

from __future__ import annotations

import logging
import os

import pytest

import optimum_sparse
from optimum_sparse.cli import main as cli
from optimum_sparse.serialization import load_pruning_record
from optimum_sparse.utils import show_progress

from .helpers import SENTENCES, build_tokenizer, make_model


@pytest.fixture(autouse=True)
def _restore_progress_env(monkeypatch):
    """--no-progress writes os.environ: record the variables so that the test's changes are undone."""
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, os.environ.get(name, ""))


@pytest.fixture()
def dense(tmp_path):
    source = tmp_path / "dense"
    make_model("llama").save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(SENTENCES * 30))
    return source, text


def _prune(source, text, *extra):
    return cli.main(["--log-level", "WARNING", "--no-progress", "prune", "--model", str(source), "--method", "magnitude",
                     "--dataset", str(text), "--num-samples", "4", "--seq-len", "16", *extra])


@pytest.fixture()
def no_load(monkeypatch):
    """Fails the test if the CLI loads the model: every refusal below must come first."""
    def load(args):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(cli, "_load", load)


@pytest.mark.parametrize("case", ["file", "under-a-file", "cwd", "existing-model", "nowhere"])
def test_prune_refuses_a_bad_destination_before_loading(tmp_path, monkeypatch, caplog, no_load, case):
    (tmp_path / "file").write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    output, match = {
        "file": (["--output", "file"], "is a file"),
        "under-a-file": (["--output", "file/sub"], "is a file"),
        "cwd": (["--output", "."], "current directory"),
        "existing-model": (["--output", "model"], "already holds a model.*--overwrite"),
        "nowhere": ([], "Nowhere to put the pruned model"),
    }[case]
    with caplog.at_level(logging.ERROR):
        assert _prune("unused", "unused", *output) == 2
    assert any(__import__("re").search(match, r.getMessage()) for r in caplog.records), caplog.text
    assert (tmp_path / "model" / "config.json").read_text() == "{}"  # the other model is untouched


def test_prune_overwrite_replaces_an_existing_model(dense, tmp_path):
    source, text = dense
    out = tmp_path / "out"
    assert _prune(source, text, "--output", str(out)) == 0
    assert _prune(source, text, "--output", str(out), "--sparsity", "0.7") == 2  # refused: a model is there
    assert load_pruning_record(out).config.sparsity == 0.5
    assert _prune(source, text, "--output", str(out), "--sparsity", "0.7", "--overwrite") == 0
    record = load_pruning_record(out)
    assert record.config.sparsity == 0.7
    card = (out / "README.md").read_text()
    assert f"| Pruning time | {record.seconds:.1f} s |" in card and record.seconds > 0  # one clock: record and card
    assert "<base model>" not in card


def test_eval_only_run_warns_that_nothing_is_saved(dense, caplog, capsys):
    source, text = dense
    with caplog.at_level(logging.WARNING):
        code = _prune(source, text, "--eval", "--eval-dataset", str(text), "--eval-seq-len", "16", "--eval-windows", "2")
    assert code == 0 and "discarded after the evaluation" in caplog.text
    assert "magnitude" in capsys.readouterr().out


def test_log_line_and_report_share_one_clock(caplog):
    from optimum_sparse import PruningConfig, SparsePruner

    from .helpers import make_ids

    pruner = SparsePruner(PruningConfig(method="wanda", num_samples=8, seq_len=16))
    with caplog.at_level(logging.INFO, logger="optimum_sparse"):
        pruner.apply(make_model("llama"), dataset=make_ids(), progress=False)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Pruned ")]
    assert f"in {pruner.report.seconds:.1f} s" in line and pruner.record.seconds == pruner.report.seconds


def test_help_version_log_level(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and optimum_sparse.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--log-level", "bogus", "prune", "--model", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'BOGUS'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    for flag, default in [("--sparsity", "0.5"), ("--num-samples", "128"), ("--seq-len", "2048"), ("--batch-size", "8"),
                          ("--seed", "0")]:
        after = text.split(f"{flag} {flag.lstrip('-').replace('-', '_').upper()}", 1)[1]
        assert f"(default: {default})" in after.split(" --", 1)[0], flag
    assert "--true-sequential Recollect statistics" in text


@pytest.mark.parametrize("var", ["TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"])
def test_progress_environment_variables(monkeypatch, var):
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "")
    assert show_progress(True) and not show_progress(False)
    monkeypatch.setenv(var, "1")
    assert not show_progress(True)
    monkeypatch.setenv(var, "0")
    assert show_progress(True)


def test_no_progress_flag_sets_the_environment(monkeypatch, no_load, tmp_path):
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "")
    monkeypatch.chdir(tmp_path)
    cli.main(["--no-progress", "prune", "--model", "x"])  # refused (nowhere to save), after the flag took effect
    assert os.environ["TQDM_DISABLE"] == "1" and not show_progress(True)
