"""`optimum-cli sparse ...`: optimum-sparse's commands through Optimum's command registration.

Optimum's CLI imports every module of the `optimum.commands.register` namespace (PEP 420, no `__init__.py`) and adds
the commands in its `REGISTER_COMMANDS`. This module stays import-light: optimum-sparse is imported when the command
runs. `optimum-cli sparse prune|eval|push|finetune|demo ...` takes exactly the arguments of `optimum-sparse ...`.
"""

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class SparseCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="sparse", help="Post-training pruning (optimum-sparse): prune, eval, push, finetune, demo.")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("sparse_args", nargs=argparse.REMAINDER,
                            help="An optimum-sparse command and its arguments (see `optimum-cli sparse --help`).")

    def run(self) -> None:
        from optimum_sparse.cli.main import main

        code = main(self.args.sparse_args or ["--help"])
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [SparseCommand]
