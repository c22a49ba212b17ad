import json

import pytest
import torch
from datasets import IterableDataset

from optimum_prune import PruningConfig, prune
from optimum_prune.calibration import calibration_inputs, calibration_windows
from optimum_prune.calibration.sources import file_texts, sample_windows, tokenize_stream
from optimum_prune.data import wikipedia_articles

from ..conftest import tiny_model, token_windows

TEXT = "Calibration text about rivers, mountains and the history of Europe. " * 50


def test_sources_agree(tmp_path, bpe_tokenizer):
    from datasets import Dataset

    path = tmp_path / "calibration.txt"
    path.write_text(TEXT, encoding="utf-8")
    from_list = calibration_windows([TEXT], bpe_tokenizer, 4, 16, seed=0)
    from_file = calibration_windows(path, bpe_tokenizer, 4, 16, seed=0)
    from_dataset = calibration_windows(Dataset.from_dict({"text": [TEXT]}), bpe_tokenizer, 4, 16, seed=0)
    assert from_list.shape == (4, 16) and from_list.dtype == torch.long
    assert torch.equal(from_list, from_file) and torch.equal(from_list, from_dataset)
    assert not torch.equal(from_list, calibration_windows([TEXT], bpe_tokenizer, 4, 16, seed=1))


def test_default_source_is_the_calibration_split(bpe_tokenizer):
    windows = calibration_windows(None, bpe_tokenizer, 2, 64, seed=0)
    calibration = " ".join(wikipedia_articles("calibration"))
    for window in windows:
        decoded = bpe_tokenizer.decode(window[8:-8])
        assert decoded in calibration


def test_splits_are_disjoint():
    calibration, evaluation = wikipedia_articles("calibration"), wikipedia_articles("evaluation")
    assert len(evaluation) > 20 and len(calibration) > 60
    assert not {a.splitlines()[0] for a in calibration} & {a.splitlines()[0] for a in evaluation}


@pytest.mark.parametrize("source", [[], [""], ["   ", "\n"]])
def test_empty_calibration(source, bpe_tokenizer):
    with pytest.raises(ValueError, match="calibration is empty"):
        calibration_windows(source, bpe_tokenizer, 4, 16, seed=0)


def test_bad_sources(tmp_path, bpe_tokenizer):
    with pytest.raises(ValueError, match="calibration file .*missing.txt' does not exist"):
        calibration_windows(tmp_path / "missing.txt", bpe_tokenizer, 4, 16, seed=0)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match=r"calibration file .*image.png' is not UTF-8 text \(invalid start byte at byte 0\)"):
        calibration_windows(tmp_path / "image.png", bpe_tokenizer, 4, 16, seed=0)
    with pytest.raises(ValueError, match="fewer than one window of PruningConfig.calibration_seq_len 4096"):
        calibration_windows(["short text"], bpe_tokenizer, 4, 4096, seed=0)
    with pytest.raises(ValueError, match="tokenizer is required"):
        calibration_windows([TEXT], None, 4, 16, seed=0)
    for tokenizer in (bpe_tokenizer, None):  # a wrong type is named as such, not as a missing tokenizer
        with pytest.raises(TypeError, match="calibration must be"):
            calibration_windows(42, tokenizer, 4, 16, seed=0)
    with pytest.raises(ValueError, match=r"\[samples, seq_len\] LongTensor"):
        calibration_windows(torch.zeros(16), None, 4, 16, seed=0)


def test_prune_with_empty_calibration_fails_before_touching_weights(bpe_tokenizer):
    model = tiny_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="calibration is empty"):
        prune(model, PruningConfig(method="wanda"), calibration=[""], tokenizer=bpe_tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_token_tensors_in_a_list_are_joined_into_windows():
    windows = token_windows(samples=4, seq_len=16)
    assert torch.equal(calibration_windows(list(windows), None, 4, 16, seed=0), windows)
    assert torch.equal(calibration_windows([windows[:1], windows[1:]], None, 4, 16, seed=0), windows)
    with pytest.raises(ValueError, match=r"one length, got shapes \[\(10,\), \(16,\)\]; .*one processed batch per sample"):
        calibration_windows([windows[0, :10], windows[1]], None, 4, 16, seed=0)


def test_a_tokenizer_output_is_one_processed_batch():
    from transformers import BatchEncoding

    windows = token_windows(samples=4, seq_len=16)
    encoding = BatchEncoding({"input_ids": windows, "attention_mask": torch.ones_like(windows)})
    pruned = []
    for calibration in (windows, encoding):
        model = tiny_model()
        report = prune(model, PruningConfig(method="wanda"), calibration=calibration)
        assert report.calibration_tokens == windows.numel()
        pruned.append(model)
    for first, second in zip(*(model.parameters() for model in pruned)):
        assert torch.equal(first == 0, second == 0)


def test_a_tokenised_dataset_calibrates_as_rows_drawn_from_it():
    """num_calibration_samples rows drawn with the seed, cut to calibration_seq_len, whatever format the Dataset is set
    to (torch, numpy), as the list of those rows would; other columns (labels) are not model inputs; a DatasetDict
    asks for a split."""
    from datasets import Dataset, DatasetDict

    from optimum_prune.calibration import calibration_inputs

    windows = token_windows(samples=6, seq_len=20)
    rows = {"input_ids": windows.tolist(), "attention_mask": [[1] * 20] * 6, "labels": windows.tolist()}
    drawn = calibration_inputs(Dataset.from_dict(rows), None, None, 4, 16, seed=3)
    assert len(drawn) == 4 and all(set(sample) == {"input_ids"} and sample["input_ids"].shape == (1, 16) for sample in drawn)  # padding gone
    def rows_of(samples):
        return [next(i for i, window in enumerate(windows) if torch.equal(window[:16], sample["input_ids"][0])) for sample in samples]

    chosen = rows_of(drawn)
    assert chosen == sorted(set(chosen))  # distinct rows, in the dataset's order
    assert rows_of(calibration_inputs(Dataset.from_dict(rows), None, None, 4, 16, seed=4)) != chosen  # drawn with the seed
    for kind in ("torch", "numpy"):
        again = calibration_inputs(Dataset.from_dict(rows).with_format(kind), None, None, 4, 16, seed=3)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, drawn))
    streamed = calibration_inputs(Dataset.from_dict(rows).to_iterable_dataset(), None, None, 4, 16, seed=3)
    assert rows_of(streamed) == [0, 1, 2, 3]  # a streamed dataset has no length to draw from: its first rows
    pruned = []
    for calibration in (Dataset.from_dict(rows), [{"input_ids": sample["input_ids"]} for sample in drawn]):
        model = tiny_model()
        config = PruningConfig(method="wanda", num_calibration_samples=4, calibration_seq_len=16, seed=3)
        assert prune(model, config, calibration=calibration).calibration_tokens == 4 * 16
        pruned.append(model)
    for first, second in zip(*(model.parameters() for model in pruned)):
        assert torch.equal(first, second)
    with pytest.raises(ValueError, match=r"DatasetDict of splits \['train'\]: pass one split, e.g. dataset\['train'\]"):
        prune(tiny_model(), PruningConfig(method="wanda"), calibration=DatasetDict(train=Dataset.from_dict(rows)))
    with pytest.raises(ValueError, match="row 1: input_ids must be a non-empty list of token ids"):
        prune(tiny_model(), PruningConfig(method="wanda"), calibration=Dataset.from_dict({"input_ids": [[1, 2], []]}))


def test_a_four_dimensional_mask_of_packed_samples_runs_as_given():
    ids = token_windows(samples=2, seq_len=16)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)  # True: attend (a float 4-D mask is an additive bias)
    mask[:, 0, :8, :8], mask[:, 0, 8:, 8:] = causal, causal  # two packed samples per row
    report = prune(tiny_model(), PruningConfig(method="wanda"), calibration=[{"input_ids": ids, "attention_mask": mask}])
    assert report.calibration_tokens == 32


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_calibrate_as_their_unpadded_samples(side):
    windows = token_windows(samples=3, seq_len=16)
    lengths = (16, 9, 5)
    samples = [{"input_ids": w[None, :n], "attention_mask": torch.ones(1, n, dtype=torch.long)} for w, n in zip(windows, lengths)]
    ids, mask = torch.zeros_like(windows), torch.zeros_like(windows)
    for row, (window, n) in enumerate(zip(windows, lengths)):
        place = slice(0, n) if side == "right" else slice(16 - n, 16)
        ids[row, place], mask[row, place] = window[:n], 1
    padded = {"input_ids": ids, "attention_mask": mask}
    models = []
    for calibration in (samples, padded):
        model = tiny_model()
        report = prune(model, PruningConfig(method="sparsegpt"), calibration=calibration)
        assert report.calibration_tokens == sum(lengths)
        models.append(model)
    for first, second in zip(*(model.parameters() for model in models)):
        assert torch.equal(first, second)


def test_unpadding_keeps_each_samples_entries_and_uses_unsplittable_batches_whole(caplog):
    from optimum_prune.calibration.sources import calibration_inputs, unpadded

    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    batch = {"input_ids": torch.arange(6).reshape(2, 3), "attention_mask": mask, "pixel_values": torch.arange(2.0)[:, None]}
    kept_whole = []
    first, second = unpadded(batch, kept_whole)
    assert first["input_ids"].tolist() == [[0, 1, 2]] and second["input_ids"].tolist() == [[4, 5]]
    assert second["attention_mask"].tolist() == [[1, 1]] and second["pixel_values"].tolist() == [[1.0]]
    unpadded_batch = {**batch, "attention_mask": torch.ones_like(mask)}
    assert [b is unpadded_batch for b in unpadded(unpadded_batch, kept_whole)] == [True] and not kept_whole
    two_images_each = {**batch, "pixel_values": torch.zeros(4, 1)}
    assert [b is two_images_each for b in unpadded(two_images_each, kept_whole)] == [True]
    assert kept_whole == [{"input_ids": (2, 3), "attention_mask": (2, 3), "pixel_values": (4, 1)}]
    calibration_inputs([two_images_each] * 5, None, None, 8, 16, 0)  # a DataLoader's batches: one warning, not five
    warnings = [record.getMessage() for record in caplog.records if "padded positions counting" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("5 padded calibration batch(es)")


def test_methods_calibrating_on_windows_take_a_tokenised_dataset_of_equal_unpadded_rows():
    """Structured and whole-model methods refused every tokenised Dataset; rows cut to one length without padding are
    the token windows they take (the same result as the windows themselves), padded or uneven ones are named."""
    from datasets import Dataset

    windows = token_windows(samples=6, seq_len=20)
    config = PruningConfig(method="layers", sparsity=0.3, num_calibration_samples=6, calibration_seq_len=16)
    removed = []
    for calibration in (Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": [[1] * 20] * 6}), windows[:, :16]):
        removed.append(prune(tiny_model(), config, calibration=calibration).removed)
    assert removed[0] == removed[1]
    uneven = Dataset.from_dict({"input_ids": [list(range(1, 30)), list(range(1, 10))]})
    padded = {"input_ids": windows[:2], "attention_mask": torch.tensor([[1] * 20, [0] * 4 + [1] * 16])}
    for calibration in (uneven, padded):
        with pytest.raises(ValueError, match="samples of token ids of one length without padding"):
            prune(tiny_model(), config, calibration=calibration)


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.zeros(2, 8, dtype=torch.long)}, "hold no real token"),
        ({"input_ids": torch.ones(2, 8)}, r"batch 0: input_ids must be a non-empty \[batch, seq_len\] tensor of token ids, got shape \(2, 8\) torch.float32"),
        ({"input_ids": torch.ones(8, dtype=torch.long)}, r"got shape \(8,\) torch.int64 \(one sample: ids\[None\]\)"),
        ({"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 7)}, r"attention_mask \(2, 7\) must have input_ids' shape"),
    ],
    ids=["all padding", "float ids", "one dimension", "mask shape"],
)
def test_a_processed_batch_the_model_cannot_run_is_named(batch, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        prune(model, PruningConfig(method="wanda"), calibration=[batch])
    assert not any(bool((p == 0).any()) for p in model.model.layers.parameters())


def test_a_tokenizer_output_of_lists_asks_for_tensors():
    with pytest.raises(TypeError, match="input_ids are a list, not a tensor: tokenize with return_tensors='pt'"):
        prune(tiny_model(), PruningConfig(method="wanda"), calibration={"input_ids": [[1, 2, 3]]})


def test_token_ids_of_another_tokenizer_are_named_before_any_forward(bpe_tokenizer):
    from optimum_prune import evaluate_perplexity

    model = tiny_model(vocab_size=64)  # smaller than the tokenizer's vocabulary
    with pytest.raises(ValueError, match=r"token ids run from \d+ to \d+, outside the 64 embeddings of LlamaForCausalLM"):
        prune(model, PruningConfig(method="wanda"), calibration=[TEXT], tokenizer=bpe_tokenizer)
    with pytest.raises(ValueError, match="outside the 64 embeddings"):
        prune(model, PruningConfig(method="wanda"), calibration=[{"input_ids": torch.tensor([[1, 2, 64]])}])
    with pytest.raises(ValueError, match="belong to another model"):
        evaluate_perplexity(model, bpe_tokenizer, TEXT, seq_len=16)


def test_windows_longer_than_the_models_context_are_warned_of(caplog):
    model = tiny_model()  # max_position_embeddings 128
    with caplog.at_level("WARNING", logger="optimum_prune.calibration.sources"):
        prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(samples=2, seq_len=129))
    assert "calibration windows of 129 tokens are longer than LlamaForCausalLM's context (max_position_embeddings 128)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="optimum_prune.calibration.sources"):
        prune(tiny_model(), PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(samples=2, seq_len=128))
    assert "context" not in caplog.text


def test_calibration_given_to_a_method_that_reads_none_is_warned_of(caplog):
    prune(tiny_model(), PruningConfig(method="magnitude"), calibration=token_windows(4, 16))
    assert "method 'magnitude' reads no calibration data: the calibration given is not used" in caplog.text



def own_tokenizer(bpe_tokenizer, **settings):
    """The session's tokenizer with other settings, leaving the shared one as it is."""
    return bpe_tokenizer.__class__(tokenizer_object=bpe_tokenizer.backend_tokenizer, **settings)


def prune_inputs(source, tokenizer, seq_len):
    from optimum_prune.calibration import calibration_inputs

    return calibration_inputs(source, tokenizer, None, 8, seq_len, seed=0)


def test_a_left_padded_tokenised_dataset_keeps_each_rows_real_tokens(bpe_tokenizer):
    """Rows were cut to calibration_seq_len before their padding was dropped: left padding lost the real tokens."""
    from datasets import Dataset

    texts = [TEXT[:80], TEXT[:200], "rivers"]
    unpadded = [bpe_tokenizer(text)["input_ids"][:24] for text in texts]
    for side in ("left", "right"):
        tokenizer = own_tokenizer(bpe_tokenizer, pad_token="<eos>", padding_side=side)
        dataset = Dataset.from_dict(dict(tokenizer(texts, padding="max_length", max_length=96)))
        assert [sample["input_ids"][0].tolist() for sample in prune_inputs(dataset, tokenizer, 24)] == unpadded, side


def test_a_streamed_dataset_is_read_only_as_far_as_the_windows_need_and_may_declare_no_columns(bpe_tokenizer):
    from datasets import IterableDataset

    read = []

    def rows():
        for index in range(10_000):
            read.append(index)
            yield {"text": TEXT}

    stream = IterableDataset.from_generator(rows)
    assert stream.column_names is None
    windows = calibration_windows(stream, bpe_tokenizer, 4, 16, seed=0)
    assert windows.shape == (4, 16) and len(read) < 20  # 2 × 4 × 16 tokens, and the first row peeked for its columns
    tokenised = IterableDataset.from_generator(lambda: ({"input_ids": [5, 6, 7, 8]} for _ in range(100)))
    assert [row["input_ids"].tolist() for row in prune_inputs(tokenised, None, 3)] == [[[5, 6, 7]]] * 8


def test_the_window_only_tools_take_every_source_that_gives_windows_and_check_it_against_the_model(bpe_tokenizer):
    from datasets import Dataset

    model = tiny_model("llama", vocab_size=bpe_tokenizer.vocab_size)
    tokenised = Dataset.from_dict({"input_ids": [list(range(5, 25))] * 4})
    assert calibration_windows(tokenised, None, 4, 16, 0, model, "choose_early_exit").shape == (4, 16)
    padded = own_tokenizer(bpe_tokenizer, pad_token="<eos>")([TEXT[:60], TEXT[:300]], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="choose_early_exit calibrates on windows of token ids of one length"):
        calibration_windows(padded, bpe_tokenizer, 4, 16, 0, model, "choose_early_exit")
    with pytest.raises(ValueError, match="outside the .* embeddings"):
        calibration_windows(torch.full((2, 8), 10**6), None, 2, 8, 0, model, "choose_early_exit")


def test_raw_text_a_directory_and_missing_rows_are_named_or_skipped(tmp_path, bpe_tokenizer, caplog):
    from datasets import Dataset

    with pytest.raises(ValueError, match="does not exist; a string names a local text file .* raw text goes in a list"):
        calibration_windows(TEXT, bpe_tokenizer, 4, 16, seed=0)  # longer than a file name may be
    with pytest.raises(ValueError, match="is a directory; a string names a local text file"):
        calibration_windows(str(tmp_path), bpe_tokenizer, 4, 16, seed=0)
    with_gaps = Dataset.from_dict({"text": [TEXT, None, ""]})
    assert torch.equal(calibration_windows(with_gaps, bpe_tokenizer, 4, 16, 0), calibration_windows([TEXT], bpe_tokenizer, 4, 16, 0))
    with caplog.at_level("WARNING"):
        calibration_windows(["rivers and mountains " * 4], bpe_tokenizer, 8, 8, seed=0)
    assert "fewer than 8 windows of 8 tokens take (64): the windows overlap" in caplog.text


def test_a_stream_longer_than_the_context_draws_no_tokenizer_warning_and_a_processor_stands_for_its_tokenizer(bpe_tokenizer, caplog):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = own_tokenizer(bpe_tokenizer, model_max_length=16)
    with caplog.at_level("WARNING"):
        from_tokenizer = calibration_windows([TEXT], tokenizer, 4, 8, seed=0)
    assert "indexing errors" not in caplog.text
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer, patch_size=4, image_token="<eos>")
    assert torch.equal(calibration_windows([TEXT], processor, 4, 8, seed=0), from_tokenizer)


def test_a_file_of_records_is_read_as_its_records_not_as_text(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    """A .jsonl file was calibrated on as text, its JSON syntax included. It is read in memory, quietly when
    transformers' bars are off: datasets kept an Arrow copy of each file in the user's cache, and showed its bar."""
    import json

    import datasets
    from transformers.utils import logging as transformers_logging

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "user-cache")
    rows = [{"text": TEXT[:300], "id": 1}, {"text": TEXT[300:900], "id": 2}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = calibration_windows([row["text"] for row in rows], bpe_tokenizer, 4, 16, seed=0)
    transformers_logging.disable_progress_bar()
    try:
        assert torch.equal(calibration_windows(tmp_path / "data.jsonl", bpe_tokenizer, 4, 16, seed=0), expected)
    finally:
        transformers_logging.enable_progress_bar()
    assert not (tmp_path / "user-cache").exists() and "Generating train split" not in capsys.readouterr().err
    assert not datasets.are_progress_bars_disabled()  # datasets' own setting is left as it was
    (tmp_path / "ids.json").write_text(json.dumps([{"input_ids": list(range(5, 30))}] * 3))
    assert calibration_windows(str(tmp_path / "ids.json"), None, 3, 16, seed=0).shape == (3, 16)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl' could not be read as json records"):
        calibration_windows(tmp_path / "bad.jsonl", bpe_tokenizer, 4, 16, seed=0)


def test_a_csv_of_token_ids_is_read_as_the_other_record_files(tmp_path):
    """The --calibration help promised a .csv with an input_ids column, whose cells are text: every row was refused."""
    import json

    rows = [{"input_ids": list(range(5, 30))}] * 3
    (tmp_path / "ids.json").write_text(json.dumps(rows))
    (tmp_path / "ids.csv").write_text("input_ids\n" + "".join(f'"{row["input_ids"]}"\n' for row in rows))
    expected = calibration_windows(str(tmp_path / "ids.json"), None, 3, 16, seed=0)
    assert torch.equal(calibration_windows(str(tmp_path / "ids.csv"), None, 3, 16, seed=0), expected)


def test_sample_windows_refuses_a_stream_that_is_not_one_dimensional():
    """A [1, N] tensor (a tokenizer's output, ids[0] forgotten) gave windows of shape (3, 0, N)."""
    with pytest.raises(ValueError, match=r"takes a 1-D token stream, got shape \(1, 100\): pass ids\[0\]"):
        sample_windows(torch.arange(100)[None], 3, 10, 0)
    with pytest.raises(ValueError, match="at least 1, got 0 and 10"):
        sample_windows(torch.arange(100), 0, 10, 0)


def test_windows_are_slices_of_the_stream_at_every_start_the_last_included():
    """A stream of exactly one window gives that window; windows start anywhere in [0, tokens - seq_len]."""
    tokens = torch.arange(16)
    assert torch.equal(sample_windows(tokens, 3, 16, seed=0), tokens.expand(3, 16))
    windows = sample_windows(torch.arange(20), 200, 16, seed=0)
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(16))
    assert sorted(set(starts.tolist())) == [0, 1, 2, 3, 4]


def test_packed_samples_are_not_taken_for_windows():
    """A batch whose 4-D mask packs two samples in a row is no window of token ids: the window-only tools refuse it
    rather than calibrate across the samples' boundary."""
    ids = token_windows(samples=2, seq_len=16)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[:, 0, :8, :8], mask[:, 0, 8:, 8:] = causal, causal
    with pytest.raises(ValueError, match="calibrates on windows of token ids of one length"):
        calibration_windows([{"input_ids": ids, "attention_mask": mask}], None, 2, 16, seed=0)


def test_every_sample_of_processed_batches_is_used():
    """Processed batches are used whole, as given: all twelve samples of a padded batch, whatever
    num_calibration_samples says, each its real tokens."""
    windows = token_windows(samples=12, seq_len=8)
    mask = torch.ones_like(windows)
    mask[:, :2] = 0  # left padding
    samples = calibration_inputs({"input_ids": windows, "attention_mask": mask}, None, None, 4, 8, 0)
    assert [s["input_ids"].tolist() for s in samples] == [[row] for row in windows[:, 2:].tolist()]


def test_documents_are_joined_by_blank_lines_into_one_stream(bpe_tokenizer):
    documents = ["First document about rivers.", "Second one, about mountains."]
    joined = bpe_tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"]
    assert tokenize_stream(bpe_tokenizer, documents).tolist() == joined


def test_a_streamed_dataset_is_read_until_twice_the_windows_tokens(bpe_tokenizer):
    row = "A short row of text about rivers."
    per_row = len(bpe_tokenizer(row, add_special_tokens=False)["input_ids"])
    read = []

    def rows():
        for index in range(10_000):
            read.append(index)
            yield {"text": row}

    calibration_windows(IterableDataset.from_generator(rows), bpe_tokenizer, 4, 16, seed=0)
    needed = -(-2 * 4 * 16 // per_row)  # rows holding twice the windows' tokens
    assert needed <= max(read) + 1 <= needed + 1  # the rows of the longest pass over the stream (one may be read ahead)


def test_processed_batches_name_a_non_tensor_entry():
    import torch

    from optimum_prune import prune

    batch = {"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.ones(1, 8, dtype=torch.long), "text": ["a b"]}
    with pytest.raises(ValueError, match="'text'"):  # was: AttributeError 'list' object has no attribute 'to'
        prune(tiny_model(), {"method": "wanda"}, calibration=[batch])


def test_records_with_non_string_text_are_named(tmp_path, bpe_tokenizer):
    from optimum_prune import prune
    from optimum_prune.calibration.sources import file_texts

    records = tmp_path / "paragraphs.jsonl"
    records.write_text('{"text": ["the cat sat", "on the mat"]}\n{"text": ["a dog"]}\n')
    config = {"method": "wanda", "num_calibration_samples": 2, "calibration_seq_len": 2}
    with pytest.raises(ValueError, match="not a string"):  # was: AttributeError 'list' object has no attribute 'strip'
        prune(tiny_model(), config, calibration=str(records), tokenizer=bpe_tokenizer)
    with pytest.raises(ValueError, match="paragraphs.jsonl"):  # --eval-file was: "text must be ... a list of strings, got list"
        file_texts(records, "--eval-file")


class CountingTokenizer:
    """A tokenizer that counts the characters it is asked to tokenise."""

    def __init__(self, inner):
        self.inner, self.characters = inner, 0

    def __call__(self, text, **kwargs):
        self.characters += len(text) if isinstance(text, str) else sum(map(len, text))
        return self.inner(text, **kwargs)


def test_a_text_dataset_larger_than_the_windows_need_is_not_tokenised_whole(bpe_tokenizer):
    """Every row was joined and tokenised in one call, ~140 bytes of memory per character (a C4 shard: >100 GB)
    for 4 windows of 64 tokens; documents are now drawn at random until they hold twice the windows' tokens."""
    from datasets import Dataset

    articles = wikipedia_articles("calibration")
    dataset = Dataset.from_dict({"text": [articles[i % len(articles)][:2000] for i in range(200)]})
    tokenizer = CountingTokenizer(bpe_tokenizer)
    windows = calibration_inputs(dataset, tokenizer, None, 4, 64, 0)
    assert windows.shape == (4, 64)
    assert tokenizer.characters < sum(map(len, dataset["text"])) / 10
    again = calibration_inputs(dataset, bpe_tokenizer, None, 4, 64, 0)
    assert torch.equal(windows, again)  # the seed draws the documents too
    assert not torch.equal(windows, calibration_inputs(dataset, bpe_tokenizer, None, 4, 64, 1))


def test_texts_that_hold_no_more_than_the_windows_need_are_one_stream_as_before(bpe_tokenizer):
    texts = [article[:300] for article in wikipedia_articles("calibration")[:3]]  # < 2 × 4 × 128 bytes
    expected = sample_windows(tokenize_stream(bpe_tokenizer, texts), 4, 128, 0)
    assert torch.equal(calibration_inputs(texts, bpe_tokenizer, None, 4, 128, 0), expected)


def test_an_unpadded_tokenizer_batch_with_token_type_ids_feeds_window_methods(bpe_tokenizer):
    """PreTrainedTokenizerFast returns all-zero token_type_ids by default: such a batch was refused as "padded or
    uneven" by the methods that calibrate on windows."""
    batch = bpe_tokenizer(" ".join(wikipedia_articles("calibration"))[:3000], return_tensors="pt", truncation=True, max_length=64)
    assert "token_type_ids" in batch
    config = PruningConfig(method="layers", sparsity=0.34, num_calibration_samples=1, calibration_seq_len=64)
    prune(tiny_model(), config, calibration=batch, tokenizer=bpe_tokenizer)


def test_token_ids_past_the_context_are_warned_of_with_a_fix_that_applies_to_them(caplog):
    """The warning said "lower calibration_seq_len", which does not cut token ids (they are used as given)."""
    stream = torch.randint(0, 320, (1, 1000), generator=torch.Generator().manual_seed(0))
    config = PruningConfig(method="wanda", sparsity=0.5, num_calibration_samples=4, calibration_seq_len=64)
    with caplog.at_level("WARNING"):
        prune(tiny_model(), config, calibration=stream)
    assert "longer than LlamaForCausalLM's context" in caplog.text and "sample_windows(ids[0]" in caplog.text


def test_a_streamed_datasets_windows_come_from_its_first_documents_in_order(bpe_tokenizer):
    """A stream is read only as far as the windows need, in order; drawing documents again would change its windows."""
    from datasets import Dataset

    from optimum_prune.calibration.sources import _stream_prefix

    articles = wikipedia_articles("calibration")
    streamed = Dataset.from_dict({"text": [articles[i % len(articles)][:300] for i in range(200)]}).to_iterable_dataset()
    first = _stream_prefix(streamed, bpe_tokenizer, 2 * 4 * 64)
    expected = sample_windows(tokenize_stream(bpe_tokenizer, first), 4, 64, 0)
    assert torch.equal(calibration_inputs(streamed, bpe_tokenizer, None, 4, 64, 0), expected)


def test_a_records_file_whose_name_holds_glob_characters_is_read_itself(tmp_path):
    """datasets reads ``data_files`` as a glob: "calib[12].jsonl" read calib1.jsonl and calib2.jsonl instead."""
    (tmp_path / "calib[12].jsonl").write_text(json.dumps({"text": "mine"}) + "\n")
    (tmp_path / "calib1.jsonl").write_text(json.dumps({"text": "another file"}) + "\n")
    (tmp_path / "star*.jsonl").write_text(json.dumps({"text": "star"}) + "\n")
    (tmp_path / "starfish.jsonl").write_text(json.dumps({"text": "fish"}) + "\n")
    assert file_texts(tmp_path / "calib[12].jsonl", "--calibration") == ["mine"]
    assert file_texts(tmp_path / "star*.jsonl", "--calibration") == ["star"]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_an_eval_file_keeps_its_blank_records_in_every_records_format(tmp_path, suffix):
    """pandas read a CSV's empty fields as missing values, which were dropped: the scored text was another."""
    import pandas as pd

    records = ["", " = Title = \n", "", " Some text . \n", "NA", "null", ""]
    frame, path = pd.DataFrame({"text": records}), tmp_path / f"eval.{suffix}"
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True), "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[suffix]()  # fmt: skip
    assert file_texts(path, "--eval-file") == records
