"""`optimum-sparse push FOLDER REPO_ID`: upload a saved pruned model to the Hub in one commit."""

from __future__ import annotations

import argparse
import logging

__all__ = ["add_parser", "run"]

logger = logging.getLogger("optimum_sparse.cli")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "push", help="Push a saved pruned model folder to the Hugging Face Hub (one commit).",
        description="Uploads a folder written by `optimum-sparse prune --output` or `SparsePruner.save_pretrained` "
                    "to a Hub repository (created if needed), in one commit. The token comes from HF_TOKEN or `hf auth "
                    "login` (never from the command line, where it would end up in the shell history); the Hub from "
                    "HF_ENDPOINT (default https://huggingface.co).",
    )
    parser.add_argument("folder", help="Folder holding the pruned model.")
    parser.add_argument("repo_id", help="Target repository, 'namespace/name'.")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    parser.add_argument("--revision", default=None, help="Branch to push to (created if needed).")
    parser.add_argument("--commit-message", default=None, help="Commit title.")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from ..hub.push import HubPushError, push_folder
    from ..serialization import NotAPrunedModelError

    try:
        info = push_folder(args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                           commit_message=args.commit_message, create_pr=args.create_pr)
    except NotAPrunedModelError as err:
        logger.error("%s", err)
        return 2
    except HubPushError as err:
        logger.error("%s", err)
        return 1
    print(f"Pushed {args.folder} to {info.pr_url or info.commit_url}")
    return 0
