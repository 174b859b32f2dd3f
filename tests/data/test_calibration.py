"""Calibration sources: strings, local files, datasets, pre-tokenized ids; seeded window sampling."""

import json

import pytest
import torch

from optimum_sparse.data import CalibrationError, get_calibration_ids, load_texts, sample_windows, tokenize_texts

from ..helpers import SENTENCES

TEXTS = [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES))]  # ~600 tokens in all


def is_window_of(row: torch.Tensor, stream: torch.Tensor) -> bool:
    n = row.numel()
    return any(torch.equal(stream[s : s + n], row) for s in range(stream.numel() - n + 1))


@pytest.fixture
def stream(tokenizer):
    return tokenize_texts(TEXTS, tokenizer)


def test_tokenize_texts(tokenizer, stream):
    assert stream.dim() == 1 and stream.dtype == torch.long
    assert stream.numel() > 300
    # joined by blank lines, no special tokens
    expected = tokenizer("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"]
    assert stream.tolist() == expected
    # blank texts are skipped
    assert torch.equal(tokenize_texts(["", TEXTS[0], "   "], tokenizer), tokenize_texts([TEXTS[0]], tokenizer))


def test_list_of_strings(tokenizer, stream):
    ids = get_calibration_ids(TEXTS, tokenizer, num_samples=6, seq_len=20, seed=0)
    assert ids.shape == (6, 20) and ids.dtype == torch.long
    for row in ids:
        assert is_window_of(row, stream)


def test_seeded_determinism(tokenizer):
    a = get_calibration_ids(TEXTS, tokenizer, 8, 16, seed=3)
    b = get_calibration_ids(TEXTS, tokenizer, 8, 16, seed=3)
    c = get_calibration_ids(TEXTS, tokenizer, 8, 16, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_windows_stays_in_bounds():
    stream = torch.arange(20)
    windows = sample_windows(stream, num_samples=50, seq_len=19, seed=0)
    assert windows.shape == (50, 19)
    assert bool((windows[:, 1:] - windows[:, :-1] == 1).all())  # contiguous
    assert int(windows.max()) < 20
    with pytest.raises(CalibrationError, match="too short for seq_len=20"):
        sample_windows(stream, 1, 20, 0)


def test_local_txt(tmp_path, tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(TEXTS), encoding="utf-8")
    assert load_texts(str(path)) == ["\n\n".join(TEXTS)]
    ids = get_calibration_ids(str(path), tokenizer, 4, 16, seed=1)
    assert torch.equal(ids, get_calibration_ids(["\n\n".join(TEXTS)], tokenizer, 4, 16, seed=1))


def test_local_jsonl(tmp_path, tokenizer):
    path = tmp_path / "calib.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")  # a blank line inside
    assert load_texts(str(path)) == TEXTS
    ids = get_calibration_ids(str(path), tokenizer, 4, 16, seed=1)
    assert torch.equal(ids, get_calibration_ids(TEXTS, tokenizer, 4, 16, seed=1))


def test_jsonl_without_text_field(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:2.*'text'"):
        get_calibration_ids(str(path), tokenizer, 1, 4)


def test_datasets_dataset(tokenizer):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": TEXTS[:4] + [""] + TEXTS[4:], "label": list(range(len(TEXTS) + 1))})
    assert load_texts(data) == TEXTS
    assert torch.equal(get_calibration_ids(data, tokenizer, 4, 16, seed=2), get_calibration_ids(TEXTS, tokenizer, 4, 16, seed=2))
    with pytest.raises(CalibrationError, match="no 'text' column"):
        load_texts(datasets.Dataset.from_dict({"content": TEXTS}))


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.int16])
def test_pretokenized_tensor_used_exactly(dtype):
    ids = torch.randint(0, 100, (3, 7), dtype=dtype)
    out = get_calibration_ids(ids, tokenizer=None, num_samples=128, seq_len=2048, seed=0, vocab_size=100)
    assert out.dtype == torch.long and out.shape == (3, 7)
    assert torch.equal(out, ids.long())


@pytest.mark.parametrize("ids", [torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool), [[True, False], [False, True]]],
                         ids=["float", "bool", "bool-lists"])
def test_pretokenized_ids_must_be_integers(ids):
    with pytest.raises(CalibrationError, match="must be integers"):
        get_calibration_ids(ids, None, 1, 1)


def test_pretokenized_lists_used_exactly():
    rows = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    out = get_calibration_ids(rows, None, 128, 2048)
    assert out.tolist() == rows and out.dtype == torch.long
    assert get_calibration_ids(tuple(tuple(r) for r in rows), None, 1, 1).tolist() == rows


def test_vocab_bounds_checked_for_every_source(tokenizer):
    ids = get_calibration_ids(TEXTS, tokenizer, 4, 16, seed=0)
    with pytest.raises(CalibrationError, match=r"\[0, 5\)"):
        get_calibration_ids(TEXTS, tokenizer, 4, 16, seed=0, vocab_size=5)
    assert torch.equal(get_calibration_ids(TEXTS, tokenizer, 4, 16, seed=0, vocab_size=len(tokenizer)), ids)


def test_load_texts_split_validated():
    with pytest.raises(ValueError, match="'calibration' or 'evaluation'"):
        load_texts(TEXTS, split="train")


class _FakeHub:
    """Stands in for `datasets.load_dataset` (no network): records calls, returns a small Dataset."""

    def __init__(self, column="text"):
        self.calls = []
        self.column = column

    def __call__(self, *args, **kwargs):
        import datasets

        self.calls.append((args, kwargs))
        split = kwargs.get("split")
        texts = [f"{split} {t}" for t in TEXTS] + [""]
        return datasets.Dataset.from_dict({self.column: texts})


@pytest.mark.parametrize("name,expected_args,column,calib_split,eval_split", [
    ("wikitext2", ("wikitext", "wikitext-2-raw-v1"), "text", "train", "test"),
    ("c4", ("allenai/c4", "en"), "text", "train", "validation"),
    ("ptb", ("ptb_text_only", "penn_treebank"), "sentence", "train", "test"),
    ("someone/my-corpus", ("someone/my-corpus",), "text", "train", "test"),
])
def test_hub_dataset_names(monkeypatch, tokenizer, name, expected_args, column, calib_split, eval_split):
    datasets = pytest.importorskip("datasets")
    fake = _FakeHub(column)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    calib = load_texts(name, "calibration")
    held_out = load_texts(name, "evaluation")
    assert fake.calls == [(expected_args, {"split": calib_split}), (expected_args, {"split": eval_split})]
    assert calib == [f"{calib_split} {t}" for t in TEXTS]  # empty rows dropped
    assert held_out == [f"{eval_split} {t}" for t in TEXTS]
    ids = get_calibration_ids(name, tokenizer, 4, 16, seed=0)
    assert ids.shape == (4, 16)
