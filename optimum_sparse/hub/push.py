"""Pushing pruned models to the Hugging Face Hub (or a self-hosted Hub): one commit through `HfApi`."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shlex
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo, HfApi

    from ..report import PruningReport

__all__ = ["HubPushError", "push_folder", "push_pruned_model", "resolve_endpoint"]

logger = logging.getLogger(__name__)

_PLACEHOLDER = "<this repo>"
_TOKEN_LIKE = re.compile(r"(Bearer\s+)\S+|hf_[A-Za-z0-9]{8,}")


class HubPushError(RuntimeError):
    """A push failed. Nothing local was changed: `folder` still holds the model; the message says how to retry.

    Attributes:
        folder (`str`): the local folder that was being pushed.
        repo_id (`str`): the target repository.
        status_code (`int`, *optional*): the HTTP status of the failed request.
    """

    def __init__(self, message: str, folder: str, repo_id: str, status_code: Optional[int] = None):
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id
        self.status_code = status_code


def resolve_endpoint(endpoint: Optional[str] = None) -> str:
    """The Hub endpoint: `endpoint`, else `HF_ENDPOINT` (read now, not at import), else huggingface_hub's default."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _scrub(text: str, secrets: list) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _TOKEN_LIKE.sub(lambda m: (m.group(1) or "") + "***", text)


def _retry_hint(folder: str, repo_id: str, private: Optional[bool], revision: Optional[str], endpoint: str) -> str:
    cmd = f"optimum-sparse push {shlex.quote(folder)} {shlex.quote(repo_id)}"
    if revision:
        cmd += f" --revision {shlex.quote(revision)}"
    if private:
        cmd += " --private"
    env = "" if endpoint == _default_endpoint() else f"HF_ENDPOINT={shlex.quote(endpoint)} "
    return f"The local folder {folder} is intact. Retry with:\n  {env}{cmd}"


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _explain(err: Exception, endpoint: str, repo_id: str) -> tuple[str, Optional[int]]:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        reason = (f"authentication failed (HTTP 401): {endpoint} rejected the token (invalid, expired, or missing). "
                  "Set HF_TOKEN to a token with write access, or run `hf auth login`.")
    elif status == 403:
        reason = (f"permission denied (HTTP 403): the token cannot write to {repo_id}. Use a token with write "
                  "access to that namespace.")
    elif status is not None and status >= 500:
        reason = f"the Hub at {endpoint} answered with a server error (HTTP {status}); nothing was committed."
    elif status is not None:
        reason = f"the Hub at {endpoint} refused the request (HTTP {status})."
    else:
        reason = f"could not complete the upload to {endpoint} ({type(err).__name__})."
    detail = str(err).strip().splitlines()
    if detail:
        reason += f"\nServer said: {detail[0]}"
    return reason, status


def _operations(folder: str, repo_id: str) -> list:
    """One `CommitOperationAdd` per file (hidden entries skipped); the card's repo placeholders filled in memory."""
    from huggingface_hub import CommitOperationAdd

    from ..serialization import CARD_NAME

    ops = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            content: Union[str, bytes] = path
            if rel == CARD_NAME:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                named = _card_for_repo(text, repo_id)
                if named != text:
                    content = named.encode("utf-8")
            ops.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    return ops


def _card_for_repo(text: str, repo_id: str) -> str:
    """The card with its repo placeholders filled and its model-index entry named after the repository."""
    from huggingface_hub import ModelCard

    text = text.replace(_PLACEHOLDER, repo_id)
    try:
        card = ModelCard(text)
    except Exception:  # not a card we can parse: uploaded as written
        return text
    name = repo_id.split("/")[-1]
    if card.data.eval_results and card.data.model_name != name:
        card.data.model_name = name
        return str(card)
    return text


def _stale_weights(api: "HfApi", repo_id: str, revision: Optional[str], local: set) -> list:
    """Deletions of remote weight files the new upload does not contain (stale shards of an earlier push)."""
    from huggingface_hub import CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    from ..serialization.record import WEIGHT_FILE_PATTERNS

    try:
        remote = api.list_repo_files(repo_id, revision=revision)
    except HfHubHTTPError as err:  # new branch or empty repo
        if getattr(getattr(err, "response", None), "status_code", None) in (401, 403):
            raise
        return []
    return [CommitOperationDelete(path_in_repo=f) for f in remote
            if f not in local and any(fnmatch.fnmatch(f, p) for p in WEIGHT_FILE_PATTERNS)]


def push_folder(folder: Union[str, os.PathLike], repo_id: str, *, private: Optional[bool] = None,
                revision: Optional[str] = None, token: Optional[str] = None, commit_message: Optional[str] = None,
                commit_description: Optional[str] = None, create_pr: bool = False, endpoint: Optional[str] = None,
                api: Optional["HfApi"] = None) -> "CommitInfo":
    """Pushes a saved pruned model folder to a Hub repository, in one commit.

    Creates the repository if needed (`exist_ok`), the branch `revision` if it does not exist, then commits every
    file (weights, config, tokenizer, card, plot, pruning record; stale weight shards of an earlier push removed) with
    `HfApi.create_commit`; large files go the way the client sends them (LFS or Xet, as the server asks).

    Args:
        folder: a folder saved by `SparsePruner.save_pretrained` (checked first).
        repo_id: `"namespace/name"`.
        private: create the repository private (ignored when it exists).
        revision: branch to push to (default `main`).
        token: a Hub token; default: `HF_TOKEN`, then the token saved by `hf auth login`. Never logged.
        commit_message: defaults to "Upload pruned model (<method>, <sparsity>)".
        commit_description: longer commit description.
        create_pr: open a pull request instead of committing to the branch.
        endpoint: Hub URL; default: `HF_ENDPOINT`, then https://huggingface.co.
        api: an `HfApi` to use instead of a new one (its endpoint and token then apply).

    Returns:
        `huggingface_hub.CommitInfo` (`commit_url`, `oid`, `pr_url`).

    Raises:
        `NotAPrunedModelError`: the folder is not a saved pruned model (nothing is sent).
        `HubPushError`: the upload failed (the local folder is left as it was; the message says how to retry).
    """
    from huggingface_hub import HfApi, get_token

    from ..serialization import check_pruned_folder

    folder = os.path.abspath(os.fspath(folder))
    record = check_pruned_folder(folder)
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string like 'user/model', got {repo_id!r}.")
    endpoint = resolve_endpoint(endpoint) if api is None else api.endpoint.rstrip("/")
    api = api or HfApi(endpoint=endpoint, token=token)
    secrets = [token] if token else []
    try:
        resolved = get_token()
        if resolved:
            secrets.append(resolved)
    except Exception:  # pragma: no cover - token lookup problems surface in the request itself
        pass
    if commit_message is None:
        label = record.structure if record.config.nm else f"{record.config.sparsity:.0%}"
        commit_message = f"Upload pruned model ({record.method}, {label}) with optimum-sparse"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        repo_id = getattr(url, "repo_id", None) or repo_id  # "name" alone resolves to the token's namespace
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        operations = _operations(folder, repo_id)
        operations += _stale_weights(api, repo_id, revision, {op.path_in_repo for op in operations})
        info = api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, revision=revision, create_pr=create_pr,
                                 token=token)
    except Exception as err:  # the client raises HfHubHTTPError, httpx errors, OSError, ValueError...
        reason, status = _explain(err, endpoint, repo_id)
        message = _scrub(f"Pushing {folder} to {repo_id} failed: {reason}\n"
                         f"{_retry_hint(folder, repo_id, private, revision, endpoint)}", secrets)
        raise HubPushError(message, folder, repo_id, status) from err
    logger.info("Pushed %s to %s/%s (commit %s).", folder, endpoint, repo_id, info.oid)
    return info


def push_pruned_model(model: Any, repo_id: str, record: "PruningReport", *, tokenizer: Any = None,
                      save_directory: Optional[Union[str, os.PathLike]] = None, private: Optional[bool] = None,
                      revision: Optional[str] = None, token: Optional[str] = None,
                      commit_message: Optional[str] = None, commit_description: Optional[str] = None,
                      create_pr: bool = False, endpoint: Optional[str] = None, api: Optional["HfApi"] = None,
                      card_kwargs: Optional[dict] = None, **save_kwargs) -> "CommitInfo":
    """Saves a pruned model (to `save_directory`, or a temporary folder) and pushes it with `push_folder`.

    A temporary folder is removed after a successful push and kept after a failed one, so the push can be retried
    with `optimum-sparse push FOLDER REPO_ID` without pruning again (the error message names it).
    """
    from ..serialization import save_pruned_model

    temporary = save_directory is None
    if temporary:
        parent = tempfile.mkdtemp(prefix="optimum-sparse-push-")
        save_directory = os.path.join(parent, repo_id.replace("/", "--"))
    card = {"repo_id": repo_id, **(card_kwargs or {})}
    folder = save_pruned_model(model, save_directory, record, tokenizer=tokenizer, card_kwargs=card, **save_kwargs)
    info = push_folder(folder, repo_id, private=private, revision=revision, token=token,
                       commit_message=commit_message, commit_description=commit_description, create_pr=create_pr,
                       endpoint=endpoint, api=api)
    if temporary:
        shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
    return info
