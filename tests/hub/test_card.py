"""The model card: every field rendered, metadata validated with huggingface_hub's own parsers, the plot."""

from __future__ import annotations

import copy
import json
import os
import shlex

import pytest

from optimum_sparse.hub.card import build_model_card, reproduce_commands, validate_model_card, write_model_card


def test_card_renders_every_field(pruned, saved_folder):
    from huggingface_hub import ModelCard

    _, pruner, _ = pruned
    record = pruner.record
    card = ModelCard.load(os.path.join(saved_folder, "README.md"), ignore_metadata_errors=False)
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"optimum-sparse", "pruned", "sparse", "sparsegpt", "unstructured-sparsity"} <= set(data.tags)
    (result,) = data.eval_results  # model-index, parsed back by huggingface_hub
    assert (result.task_type, result.metric_type, result.metric_value) == ("text-generation", "perplexity", 130.25)
    assert result.dataset_type == "wiki-offline" and result.dataset_split == "evaluation"
    text = card.text
    assert "| Dense (the dense model) | 121.500 |" in text and "| Pruned (this model) | 130.250 |" in text
    assert "<base model>" not in text  # the dense model is unknown: the commands read $BASE_MODEL, said so
    assert "non-overlapping 16-token windows, 4 windows" in text
    assert "pre-tokenized input_ids tensor [8, 16]: 8 sequences × 16 tokens (seed 0)" in text
    assert "![Per-layer sparsity and relative reconstruction error](sparsity_plot.png)" in text
    for layer in record.layers:  # the per-layer table, with the reconstruction errors
        assert f"| `{layer.name}` | {layer.shape[0]} × {layer.shape[1]} | 50.00% | {layer.relative_error:.4g} |" in text
    assert 'optimum-sparse prune --model "$BASE_MODEL" --config pruning_config.json' in text
    assert 'load_model_and_tokenizer(os.environ["BASE_MODEL"]' in text and "export BASE_MODEL=" in text
    assert "--method sparsegpt" in text and "--num-samples 8" in text and "--seq-len 16" in text
    config_json = text.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(config_json) == record.config.to_dict()  # the exact config
    with open(os.path.join(saved_folder, "sparsity_plot.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_card_with_base_model_and_repo(pruned):
    _, pruner, _ = pruned
    card = build_model_card(pruner.record, repo_id="me/llama-sparse", base_model="meta-llama/Llama-3.2-1B",
                            license="llama3.2", plot_file="sparsity_plot.png")
    assert card.data.base_model == "meta-llama/Llama-3.2-1B" and card.data.license == "llama3.2"
    assert card.data.model_name == "llama-sparse" and card.data.eval_results[0].metric_value == 130.25
    assert "(https://huggingface.co/meta-llama/Llama-3.2-1B)" in card.text
    assert 'from_pretrained("me/llama-sparse"' in card.text and "<this repo>" not in card.text
    assert "optimum-sparse prune --model meta-llama/Llama-3.2-1B --config" in card.text
    validate_model_card(str(card))
    # local paths are never published as base_model
    assert build_model_card(pruner.record, base_model="/data/models/llama").data.base_model is None


def test_card_reproduces_with_the_alias_the_run_loaded(pruned):
    _, pruner, _ = pruned
    card = build_model_card(pruner.record, model_arg="smollm2-135m")
    assert "optimum-sparse prune --model smollm2-135m --config" in card.text
    assert 'load_model_and_tokenizer("smollm2-135m", dtype="auto")' in card.text and "BASE_MODEL" not in card.text
    assert card.data.base_model is None  # an alias is not a Hub id


def test_card_without_perplexity_or_plot(pruned, tmp_path, monkeypatch):
    _, pruner, _ = pruned
    record = copy.deepcopy(pruner.record)
    record.perplexity = None
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    card = write_model_card(str(tmp_path), record)
    assert os.listdir(tmp_path) == ["README.md"]
    assert card.data.eval_results is None and "model-index" not in str(card)
    assert "Perplexity was not measured" in card.text and "sparsity_plot.png" not in card.text


def test_invalid_metadata_is_caught():
    with pytest.raises(ValueError):
        validate_model_card("---\n- just\n- a list\n---\n# card\n")
    with pytest.raises(ValueError, match="model_index"):
        validate_model_card("---\nmodel-index:\n- results:\n  - task: {}\n---\n")


def test_reproduce_commands_quote_everything(pruned):
    from optimum_sparse import PruningConfig

    record = copy.deepcopy(pruned[1].record)
    record.config = PruningConfig(method="wanda", structure="2:4", dataset="my data.txt", ignore=["re:.*down_proj"],
                                  true_sequential=True)
    with_config, with_flags = reproduce_commands(record, "org/model")
    assert with_config == "optimum-sparse prune --model org/model --config pruning_config.json --output pruned/"
    assert "--structure 2:4" in with_flags and "--dataset 'my data.txt'" in with_flags
    assert "--ignore 're:.*down_proj'" in with_flags and "--true-sequential" in with_flags
    from optimum_sparse.cli.main import build_parser

    args = build_parser().parse_args(shlex.split(with_flags.replace("\\\n", " "))[1:])  # the flags parse
    assert (args.method, args.structure, args.true_sequential) == ("wanda", "2:4", True)
