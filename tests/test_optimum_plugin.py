"""optimum-sparse as an Optimum plugin: `optimum-cli sparse ...` through Optimum's command registration and the
`optimum.sparse` import path (issue 20, ecosystem)."""

import sys

import pytest

optimum_cli = pytest.importorskip("optimum.commands.optimum_cli")


def run_optimum_cli(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["optimum-cli", *argv])
    with pytest.raises(SystemExit) as stop:
        optimum_cli.main()
    return stop.value.code


def test_optimum_cli_registers_the_sparse_command():
    from optimum.commands.register.register_sparse import REGISTER_COMMANDS, SparseCommand

    registered = [command for command, _ in optimum_cli.load_optimum_namespace_cli_commands()]
    assert SparseCommand in registered and REGISTER_COMMANDS == [SparseCommand]


def test_optimum_cli_sparse_forwards_to_the_optimum_sparse_cli(monkeypatch, capsys):
    assert run_optimum_cli(monkeypatch, "sparse", "prune", "--help") == 0
    out = capsys.readouterr().out
    assert "usage: optimum-sparse prune" in out and "--sparsity" in out and "--method" in out


def test_optimum_cli_sparse_returns_the_cli_error_code(monkeypatch, capsys):
    assert run_optimum_cli(monkeypatch, "sparse", "prune", "--model", "x", "--method", "nope") == 2
    assert "invalid choice" in capsys.readouterr().err


def test_optimum_sparse_import_path_is_the_same_package():
    import optimum.sparse

    import optimum_sparse

    assert optimum.sparse.SparsePruner is optimum_sparse.SparsePruner
    assert optimum.sparse.PruningConfig is optimum_sparse.PruningConfig
    assert optimum.sparse.__version__ == optimum_sparse.__version__
