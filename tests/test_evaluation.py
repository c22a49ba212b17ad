import math

import pytest
import torch

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
    with pytest.raises(TypeError, match="text must be None .*, a string or a list of strings, got Tensor"):
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
