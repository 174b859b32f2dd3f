"""Pushing pruned models with the real huggingface_hub client, against a fake Hub on loopback."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import pytest
import torch

from optimum_sparse.cli.main import main
from optimum_sparse.hub import HubPushError, push_folder
from optimum_sparse.serialization import NotAPrunedModelError, load_pruning_record

from ..helpers import build_tokenizer, make_model
from .conftest import BAD_TOKEN, GOOD_TOKEN, USER

EXPECTED_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "pruning_config.json", "sparsity_config.json", "pruning_report.json", "README.md", "sparsity_plot.png",
}


def folder_digest(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def download(hub, repo_id, tmp_path, **kwargs):
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, endpoint=hub.url, cache_dir=str(tmp_path / "cache"), token=GOOD_TOKEN, **kwargs)


def assert_same_weights(model, folder):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_push_download_and_load(pruned, hub_env, tmp_path, caplog, capfd, monkeypatch):
    """One commit with everything; snapshot_download gets it back; transformers loads identical weights."""
    model, pruner, _ = pruned
    repo_id = f"{USER}/tiny-llama-sparsegpt"
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    caplog.set_level(logging.DEBUG)
    info = pruner.push_to_hub(model, repo_id)  # endpoint from HF_ENDPOINT, token from HF_TOKEN

    commits = hub_env.commits(repo_id)
    assert len(commits) == 2  # the repo's initial commit, then ours: one commit for the whole model
    assert commits[-1][0] == info.oid and set(commits[-1][3]) == EXPECTED_FILES
    assert "sparsegpt" in commits[-1][2]
    assert sum(1 for method, path, _ in hub_env.requests if path.endswith("/commit/main")) == 1
    readme = hub_env.files(repo_id)["README.md"].decode()
    assert f'from_pretrained("{repo_id}"' in readme and "<this repo>" not in readme  # filled in at push time
    assert os.listdir(tmp_path / "tmp") == []  # the temporary save folder is gone after a successful push

    folder = download(hub_env, repo_id, tmp_path)
    assert EXPECTED_FILES <= set(os.listdir(folder))
    assert_same_weights(model, folder)
    record = load_pruning_record(folder)
    assert record.to_dict() == pruner.record.to_dict()
    from_hub = load_pruning_record(repo_id, endpoint=hub_env.url, cache_dir=str(tmp_path / "c2"), token=GOOD_TOKEN)
    assert from_hub.to_dict() == record.to_dict() and from_hub.masks.keys() == record.masks.keys()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder)("the quick brown fox")["input_ids"]

    # the token never shows up in logs, output, or anything uploaded
    out, err = capfd.readouterr()
    assert GOOD_TOKEN not in caplog.text + out + err
    assert all(GOOD_TOKEN.encode() not in data for data in hub_env.files(repo_id).values())
    assert {token for _, _, token in hub_env.requests if token} == {GOOD_TOKEN}


def test_large_files_go_through_lfs(saved_folder, pruned, hub_env, tmp_path, monkeypatch):
    """When the server asks for LFS, the client uploads the weights and the plot through the LFS batch API."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake Hub speaks LFS, not Xet
    hub_env.lfs_patterns = ("*.safetensors", "*.png")
    repo_id = f"{USER}/lfs-model"
    push_folder(saved_folder, repo_id)
    assert any(method == "PUT" and path.startswith("/_lfs/") for method, path, _ in hub_env.requests)
    assert {p for p, b in hub_env.repos[repo_id].files().items() if b.lfs} == {"model.safetensors", "sparsity_plot.png"}
    folder = download(hub_env, repo_id, tmp_path)
    assert_same_weights(pruned[0], folder)


def test_wrong_token(saved_folder, hub_env, caplog):
    """401: a clear error naming the cause and the retry command; no token in it; the local folder untouched."""
    before = folder_digest(saved_folder)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubPushError) as excinfo:
        push_folder(saved_folder, f"{USER}/denied", token=BAD_TOKEN)
    message = str(excinfo.value)
    assert excinfo.value.status_code == 401
    assert "401" in message and "HF_TOKEN" in message
    assert f"optimum-sparse push {saved_folder} {USER}/denied" in message and "intact" in message
    assert BAD_TOKEN not in message + caplog.text and GOOD_TOKEN not in message
    assert folder_digest(saved_folder) == before
    assert f"{USER}/denied" not in hub_env.repos


def test_failed_push_keeps_the_saved_folder_then_cli_retry(pruned, hub_env, monkeypatch, capsys):
    """pruner.push_to_hub saves to a temporary folder; when the upload fails it is kept and the retry works."""
    model, pruner, _ = pruned
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    with pytest.raises(HubPushError) as excinfo:
        pruner.push_to_hub(model, f"{USER}/retry-me", commit_message="first try")
    folder = excinfo.value.folder
    assert os.path.isfile(os.path.join(folder, "model.safetensors")) and folder in str(excinfo.value)
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert main(["push", folder, f"{USER}/retry-me"]) == 0
    assert "Pushed" in capsys.readouterr().out
    assert len(hub_env.commits(f"{USER}/retry-me")) == 2


def test_existing_repo_unchanged_push_and_stale_shards(saved_folder, hub_env):
    """An existing repo is reused (exist_ok); re-pushing the same files makes no commit; stale shards are deleted."""
    from huggingface_hub import CommitOperationAdd, HfApi

    repo_id = f"{USER}/existing"
    api = HfApi(endpoint=hub_env.url, token=GOOD_TOKEN)
    api.create_repo(repo_id)
    api.create_commit(repo_id, [CommitOperationAdd("model-00002-of-00002.safetensors", b"stale"),
                                CommitOperationAdd("notes.md", b"keep me")], commit_message="older upload")
    push_folder(saved_folder, repo_id)
    files = hub_env.files(repo_id)
    assert "model-00002-of-00002.safetensors" not in files and "notes.md" in files
    from huggingface_hub import ModelCard

    card = ModelCard(files["README.md"].decode())  # saved without a repo id: the model-index is named at push time
    assert card.data.model_name == "existing" and card.data.eval_results[0].metric_value == 130.25
    assert len(hub_env.commits(repo_id)) == 3
    push_folder(saved_folder, repo_id)  # nothing changed: the client skips the empty commit
    assert len(hub_env.commits(repo_id)) == 3


def test_server_error_mid_upload(saved_folder, hub_env):
    """The commit fails with a 500 after preupload: clear error, nothing committed, local folder intact, retry works."""
    repo_id = f"{USER}/flaky"
    before = folder_digest(saved_folder)
    hub_env.fail("POST", r"/commit/", status=500)
    with pytest.raises(HubPushError) as excinfo:
        push_folder(saved_folder, repo_id)
    assert excinfo.value.status_code == 500 and "nothing was committed" in str(excinfo.value)
    assert any(path.endswith("/preupload/main") for _, path, _ in hub_env.requests)  # it failed mid-upload
    assert len(hub_env.commits(repo_id)) == 1 and folder_digest(saved_folder) == before
    push_folder(saved_folder, repo_id)
    assert len(hub_env.commits(repo_id)) == 2


def test_not_a_pruned_model(tmp_path, hub_env):
    """A plain transformers folder, an empty folder or a missing one: a clear error, and no request is sent."""
    dense = tmp_path / "dense"
    make_model("llama").save_pretrained(dense)
    with pytest.raises(NotAPrunedModelError, match="sparsity_config.json.*pruner.save_pretrained"):
        push_folder(dense, f"{USER}/dense")
    with pytest.raises(NotAPrunedModelError, match="missing"):
        push_folder(tmp_path, f"{USER}/empty")
    with pytest.raises(NotAPrunedModelError, match="not a folder"):
        push_folder(tmp_path / "nope", f"{USER}/nope")
    assert main(["push", str(dense), f"{USER}/dense"]) == 2
    assert hub_env.requests == []


def test_revision_private_and_pull_request(saved_folder, hub_env, tmp_path):
    """`revision` creates and fills a branch (main untouched); `private` hides the repo; `create_pr` opens a PR."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    repo_id = f"{USER}/private-branch"
    push_folder(saved_folder, repo_id, private=True, revision="v1", commit_message="sparse v1")
    repo = hub_env.repos[repo_id]
    assert repo.private and set(hub_env.files(repo_id)) == {".gitattributes"}
    assert EXPECTED_FILES <= set(hub_env.files(repo_id, "v1"))
    assert hub_env.commits(repo_id)[-1][1:3] == ("v1", "sparse v1")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(repo_id, endpoint=hub_env.url, cache_dir=str(tmp_path / "anon"), token=False)
    assert os.path.isfile(os.path.join(download(hub_env, repo_id, tmp_path, revision="v1"), "model.safetensors"))
    info = push_folder(saved_folder, f"{USER}/pr-target", create_pr=True)
    assert info.pr_url and info.pr_url.endswith("/discussions/1")
    push_folder(saved_folder, "no-namespace")  # a bare name goes to the token's own namespace, like the Hub does
    assert EXPECTED_FILES <= set(hub_env.files(f"{USER}/no-namespace"))


def test_model_save_pretrained_push_to_hub(pruned, hub_env, tmp_path):
    """transformers-style `model.save_pretrained(dir, push_to_hub=True, repo_id=...)` saves and pushes the record."""
    model, _, _ = pruned
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=f"{USER}/own-save", private=True)
    assert EXPECTED_FILES <= set(hub_env.files(f"{USER}/own-save")) and hub_env.repos[f"{USER}/own-save"].private
    assert EXPECTED_FILES <= set(os.listdir(tmp_path / "out"))


def test_prune_cli_push_to_hub(tmp_path, hub_env, capsys):
    """`optimum-sparse prune ... --output DIR --push-to-hub REPO` saves, then pushes the saved folder."""
    source = tmp_path / "dense"
    make_model("llama").save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    code = main(["--log-level", "WARNING", "prune", "--model", str(source), "--method", "magnitude", "--sparsity",
                 "0.5", "--num-samples", "2", "--seq-len", "16", "--output", str(out), "--push-to-hub",
                 f"{USER}/from-cli"])
    assert code == 0 and "Pushed to" in capsys.readouterr().out
    files = hub_env.files(f"{USER}/from-cli")
    assert EXPECTED_FILES <= set(files)
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()


@pytest.mark.skipif(not (os.environ.get("OPTIMUM_SPARSE_HUB_TEST_REPO") and os.environ.get("HF_TOKEN")),
                    reason="opt-in: set OPTIMUM_SPARSE_HUB_TEST_REPO=user/repo and HF_TOKEN (and HF_ENDPOINT for a "
                           "self-hosted Hub) to push to a real Hub")
def test_real_hub(saved_folder, pruned, tmp_path):
    """Against a real Hub: push to a fresh branch of the given repo, download, load, validate the card, clean up."""
    import uuid

    from huggingface_hub import HfApi, ModelCard, snapshot_download

    from optimum_sparse.hub import resolve_endpoint

    repo_id, branch = os.environ["OPTIMUM_SPARSE_HUB_TEST_REPO"], f"optimum-sparse-test-{uuid.uuid4().hex[:8]}"
    api = HfApi(endpoint=resolve_endpoint())
    push_folder(saved_folder, repo_id, revision=branch, private=True)
    try:
        folder = snapshot_download(repo_id, revision=branch, endpoint=api.endpoint, cache_dir=str(tmp_path / "c"))
        assert_same_weights(pruned[0], folder)
        assert load_pruning_record(folder).to_dict() == pruned[1].record.to_dict()
        api._validate_yaml(ModelCard.load(os.path.join(folder, "README.md")).content)  # the Hub's own check
    finally:
        api.delete_branch(repo_id, branch=branch)
