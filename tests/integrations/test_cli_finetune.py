"""`optimum-sparse finetune`: pruned folder in, merged sparse folder out (tiny model, local text, a few steps)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

pytest.importorskip("peft")

from optimum_sparse import PruningConfig, SparsePruner  # noqa: E402
from optimum_sparse.cli.main import main  # noqa: E402
from optimum_sparse.integrations import load_sparse_adapter  # noqa: E402

from ..helpers import SENTENCES, block_linears, make_model  # noqa: E402


def _zeros(model) -> dict[str, int]:
    return {name: int((m.weight == 0).sum()) for name, m in block_linears(model).items()}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(SENTENCES * 30))
    return str(path)


def _pruned_folder(tmp_path, tokenizer, structure="2:4", with_record=True):
    model = make_model("llama")
    pruner = SparsePruner(PruningConfig(method="magnitude", sparsity=0.5, structure=structure))
    pruner.apply(model, progress=False)
    folder = tmp_path / "pruned"
    if with_record:
        pruner.save_pretrained(model, folder)
    else:  # a pruned checkpoint without optimum-sparse metadata: masks come from the zeros only
        transformers.PreTrainedModel.save_pretrained(model, folder)
    tokenizer.save_pretrained(folder)
    return str(folder), _zeros(model)


def _args(folder, out, text_file, *extra):
    return ["--log-level", "WARNING", "finetune", "--model", folder, "--output", out, "--dataset", text_file,
            "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--learning-rate", "1e-2", *extra]


@pytest.mark.parametrize("with_record", [True, False])
def test_cli_finetune_keeps_sparsity(tmp_path, tokenizer, text_file, capsys, with_record):
    folder, before = _pruned_folder(tmp_path, tokenizer, with_record=with_record)
    out, adapter = str(tmp_path / "tuned"), str(tmp_path / "adapter")
    code = main(_args(folder, out, text_file, "--eval", "--eval-dataset", text_file, "--eval-seq-len", "16",
                      "--eval-windows", "4", "--save-adapter", adapter))
    assert code == 0
    printed = capsys.readouterr().out
    assert "pruned + LoRA (merged)" in printed and "sparsity of the pruned layers after the merge: 0.5000" in printed
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert _zeros(tuned) == before
    original = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(block_linears(tuned).values(),
                                                                   block_linears(original).values()))
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert "## LoRA fine-tuning (sparsity kept)" in card and "optimum-sparse finetune" in card
    info = json.loads((tmp_path / "tuned" / "lora_finetune.json").read_text())
    assert info["masked_training"] and info["sparsity_after_merge"] == pytest.approx(0.5)
    assert info["perplexity"]["finetuned"] > 0 and info["lora"]["target_modules"]
    if with_record:
        assert (tmp_path / "tuned" / "sparsity_config.json").is_file()
        assert (tmp_path / "tuned" / "pruning_config.json").is_file()
    # the saved adapter reloads onto the pruned input and merges to the same weights
    ids = torch.randint(0, 128, (2, 16))
    reloaded = load_sparse_adapter(original, adapter)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_cli_finetune_rejects_a_dense_model(tmp_path, tokenizer, text_file, caplog):
    folder = tmp_path / "dense"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    code = main(_args(str(folder), str(tmp_path / "out"), text_file))
    assert code == 2
    assert "no pruned linear layer" in caplog.text
    assert not (tmp_path / "out").exists()
