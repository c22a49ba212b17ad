import math

import pytest
import torch
from torch.nn import functional as F

from optimum_prune import evaluate_perplexity
from optimum_prune.calibration import tokenize_stream
from optimum_prune.data import wikipedia_text

from .conftest import tiny_model


def test_perplexity_equals_mean_window_loss(bpe_tokenizer):
    model = tiny_model()
    text = wikipedia_text("evaluation")[:4000]
    ppl = evaluate_perplexity(model, bpe_tokenizer, text, seq_len=64, max_tokens=640, batch_size=3)
    tokens = tokenize_stream(bpe_tokenizer, [text])[:640].reshape(10, 64)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in tokens]
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_default_text_and_errors(bpe_tokenizer):
    model = tiny_model()
    from optimum_prune.data import wikipedia_text

    default = evaluate_perplexity(model, bpe_tokenizer, seq_len=32, max_tokens=128)
    assert math.isfinite(default)
    assert default == evaluate_perplexity(model, bpe_tokenizer, wikipedia_text("evaluation"), seq_len=32, max_tokens=128)
    with pytest.raises(ValueError, match="fewer than one window of seq_len=512"):
        evaluate_perplexity(model, bpe_tokenizer, "too short", seq_len=512)
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        evaluate_perplexity(model, None)
    for batch_size in (0, -1):  # -1 scored no window: a "perfect" 1.0
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {batch_size}"):
            evaluate_perplexity(model, bpe_tokenizer, seq_len=32, max_tokens=128, batch_size=batch_size)
    with pytest.raises(TypeError, match="text must be None .*, a string, a list of strings or a file.s Path, got Tensor"):
        evaluate_perplexity(model, bpe_tokenizer, torch.zeros(2, 8, dtype=torch.long))
    # The count callers state beside the result ("perplexity (16,384 tokens)") was not checked against the text
    short = wikipedia_text("evaluation")[:2000]
    with pytest.raises(ValueError, match=r"the text has [\d,]+ tokens, fewer than max_tokens=16,384"):
        evaluate_perplexity(model, bpe_tokenizer, short, seq_len=64, max_tokens=16384)
    for max_tokens in (-100, 32):
        with pytest.raises(ValueError, match=rf"max_tokens \({max_tokens}\) must be at least seq_len \(64\)"):
            evaluate_perplexity(model, bpe_tokenizer, short, seq_len=64, max_tokens=max_tokens)
    with pytest.raises(ValueError, match=r"max_tokens \(127\) is not a multiple of seq_len \(64\): the last 63 tokens would not count; use 64"):
        evaluate_perplexity(model, bpe_tokenizer, short, seq_len=64, max_tokens=127)  # scored 64 tokens, stated as 127


class CharTokenizer:
    """One token per character: a text of n characters is exactly n tokens."""

    def __call__(self, text, **_):
        return {"input_ids": [ord(c) % 320 for c in text]}


def test_perplexity_runs_in_eval_mode_and_restores_the_mode(bpe_tokenizer):
    model = tiny_model(attention_dropout=0.5)
    text = wikipedia_text("evaluation")[:3000]
    expected = evaluate_perplexity(model, bpe_tokenizer, text, seq_len=32, max_tokens=128)
    assert not model.training
    model.train()
    assert evaluate_perplexity(model, bpe_tokenizer, text, seq_len=32, max_tokens=128) == expected
    assert model.training


def test_bf16_perplexity_sums_the_losses_in_float32(bpe_tokenizer):
    model = tiny_model().to(torch.bfloat16)
    text = wikipedia_text("evaluation")[:6000]
    ppl = evaluate_perplexity(model, bpe_tokenizer, text, seq_len=64, max_tokens=512, batch_size=8)
    windows = tokenize_stream(bpe_tokenizer, [text])[:512].reshape(8, 64)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    nll = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()
    assert ppl == pytest.approx(math.exp(nll / (8 * 63)), rel=1e-4)


def test_without_max_tokens_the_leading_whole_windows_are_scored(bpe_tokenizer):
    model = tiny_model()
    text = wikipedia_text("evaluation")[:3000]
    count = tokenize_stream(bpe_tokenizer, [text]).numel()
    assert count % 64  # a trailing partial window to drop
    whole = count - count % 64
    assert evaluate_perplexity(model, bpe_tokenizer, text, seq_len=64) == evaluate_perplexity(
        model, bpe_tokenizer, text, seq_len=64, max_tokens=whole
    )


def test_text_of_exactly_max_tokens_and_one_window_is_scored():
    model = tiny_model()
    text = "".join(chr(97 + (i * 7) % 26) for i in range(128))
    assert math.isfinite(evaluate_perplexity(model, CharTokenizer(), text, seq_len=32, max_tokens=128))
    assert math.isfinite(evaluate_perplexity(model, CharTokenizer(), text, seq_len=128, max_tokens=128))


def test_a_window_of_one_token_is_refused_by_the_window_check():
    from optimum_prune.evaluation import check_whole_windows

    with pytest.raises(ValueError, match="grid.evaluation.seq_len must be at least 2"):
        check_whole_windows(128, 1, "grid.evaluation.tokens", "grid.evaluation.seq_len")


def _merging_llava():
    """A LLaVA processor whose tokenizer merges the newline after <image> into the caption's first token."""
    from tokenizers import Tokenizer, models
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from .multimodal.conftest import IMAGE_SIZE, PATCH, tiny_llava

    vocab = {token: index for index, token in enumerate(["<eos>", "\n", "A", " ", "a", "c", "s", "t", "\nA"])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "A")])), eos_token="<eos>", pad_token="<eos>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )
    return tiny_llava(tokenizer.convert_tokens_to_ids("<image>")), processor


def test_a_newline_merged_into_the_captions_first_token_is_scored_with_the_caption():
    from optimum_prune.calibration.multimodal import image_text_batch
    from optimum_prune.data.images import image_text_pairs
    from optimum_prune.evaluation import evaluate_image_text_loss

    model, processor = _merging_llava()
    pair = {"image": image_text_pairs("evaluation")[0]["image"], "text": "A cat sat"}
    batch = image_text_batch(pair, processor, 0)
    ids = batch["input_ids"][0]
    merged = processor.tokenizer.convert_tokens_to_ids("\nA")
    start = int((ids == merged).nonzero()[0])  # the caption's tokens: "\nA", " ", "c", "a", "t", " ", "s", "a", "t"
    assert ids.numel() - start == 9
    with torch.no_grad():
        logits = model(**batch).logits[0]
    expected = F.cross_entropy(logits[start - 1 : -1].float(), ids[start:]).item()
    assert evaluate_image_text_loss(model, processor, [pair]) == pytest.approx(expected, rel=1e-5)


def test_an_empty_caption_is_refused():
    from optimum_prune.data.images import image_text_pairs
    from optimum_prune.evaluation import evaluate_image_text_loss

    model, processor = _merging_llava()
    with pytest.raises(ValueError, match="does not extend the processed prompt"):
        evaluate_image_text_loss(model, processor, [{"image": image_text_pairs("evaluation")[0]["image"], "text": ""}])


def test_the_image_text_loss_keeps_the_models_mode():
    from optimum_prune.data.images import image_text_pairs
    from optimum_prune.evaluation import evaluate_image_text_loss

    model, processor = _merging_llava()
    pair = {"image": image_text_pairs("evaluation")[0]["image"], "text": "A cat sat"}
    evaluate_image_text_loss(model, processor, [pair])
    assert not model.training


def test_evaluation_names_a_bad_device(bpe_tokenizer):
    model = tiny_model()
    with pytest.raises(ValueError, match="device 'gpu'"):  # was: RuntimeError "Expected one of cpu, cuda, ..."
        evaluate_perplexity(model, bpe_tokenizer, "the cat sat on the mat. " * 50, seq_len=16, device="gpu")


@pytest.mark.parametrize("argument", ["seq_len", "max_tokens", "batch_size"])
def test_window_counts_must_be_whole_numbers(bpe_tokenizer, argument):
    """16.0 failed deep in slicing ("slice indices must be integers"), naming no argument."""
    values = {"seq_len": 16, "max_tokens": 64, "batch_size": 1}
    with pytest.raises(TypeError, match=f"{argument} must be int, got {float(values[argument])}"):
        evaluate_perplexity(tiny_model(), bpe_tokenizer, "the cat sat on the mat. " * 50, **{**values, argument: float(values[argument])})


def test_evaluation_windows_longer_than_the_context_are_warned_of(caplog, bpe_tokenizer):
    with caplog.at_level("WARNING"):
        evaluate_perplexity(tiny_model(), bpe_tokenizer, wikipedia_text("evaluation")[:4000], seq_len=256)
    assert "evaluation windows of 256 tokens are longer than LlamaForCausalLM's context" in caplog.text and "lower seq_len" in caplog.text


@pytest.mark.parametrize("given", ["documents", "one text"])  # one text: --eval-file big.txt
def test_a_corpus_is_tokenised_only_as_far_as_max_tokens_reaches_with_the_same_result(bpe_tokenizer, given):
    texts = [wikipedia_text("evaluation")[i : i + 1500] for i in range(0, 60000, 1500)]
    counted = []

    class Counting:
        def __call__(self, text, **kwargs):
            counted.append(len(text) if isinstance(text, str) else sum(map(len, text)))
            return bpe_tokenizer(text, **kwargs)

    model = tiny_model()
    windows = tokenize_stream(bpe_tokenizer, texts)[:256].reshape(8, 32)  # the first 256 tokens of the whole stream
    with torch.no_grad():
        expected = math.exp(F.cross_entropy(model(windows).logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()))
    corpus = texts if given == "documents" else "\n\n".join(texts)
    assert evaluate_perplexity(model, Counting(), corpus, seq_len=32, max_tokens=256) == pytest.approx(expected, rel=1e-5)
    assert sum(counted) < sum(map(len, texts)) / 5


def test_a_path_is_read_as_its_file_and_a_string_naming_one_is_scored_as_text_with_a_warning(tmp_path, bpe_tokenizer, caplog):
    text_file = tmp_path / "wiki.test.raw"
    text_file.write_text("The cat sat on the mat. " * 200)
    model = tiny_model()
    from_text = evaluate_perplexity(model, bpe_tokenizer, text_file.read_text(), seq_len=8)
    assert evaluate_perplexity(model, bpe_tokenizer, text_file, seq_len=8) == pytest.approx(from_text)  # was a TypeError
    with caplog.at_level("WARNING", logger="optimum_prune.evaluation"):
        by_name = evaluate_perplexity(model, bpe_tokenizer, str(text_file), seq_len=8)
    assert by_name != pytest.approx(from_text)  # the string is the text, as documented
    assert f"pass Path({str(text_file)!r}) to score the file's contents" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="optimum_prune.evaluation"):
        evaluate_perplexity(model, bpe_tokenizer, "The cat sat on the mat. " * 20, seq_len=8)
    assert "names a file" not in caplog.text
    for missing in (tmp_path / "nope.txt", tmp_path):  # were a raw FileNotFoundError and IsADirectoryError
        with pytest.raises(ValueError, match=f"evaluation text file '{missing}' is not a file"):
            evaluate_perplexity(model, bpe_tokenizer, missing, seq_len=8)
