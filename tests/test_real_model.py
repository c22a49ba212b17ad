"""End to end on the real SmolLM2-135M-Instruct (small sizes; marked slow)."""


import pytest
import torch

from optimum_prune import PruningConfig, evaluate_perplexity, load_default_model, prune, save_pruned, verify_sparsity

from .conftest import assert_stock_reload_matches

pytestmark = pytest.mark.slow
SMALL = dict(num_calibration_samples=8, calibration_seq_len=128)


def test_default_model_and_tokenizer_choices():
    model, tokenizer = load_default_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.num_hidden_layers) == (9, 3, 30)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id == 2
    assert tokenizer("Hello").input_ids == tokenizer("Hello", add_special_tokens=False).input_ids  # no BOS prepended
    text = "A (named , plural) text ."
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # spacing kept (the conversion cleaned up the space before ",")
    assert verify_sparsity(model)["overall_sparsity"] < 0.001  # dequantised GGUF: a few exact zeros already


def test_a_gguf_file_loads_dequantised_as_the_default_model_was_converted(tmp_path):
    from optimum_prune.models import default_gguf_path, load_model

    model, tokenizer = load_model(default_gguf_path())
    default, default_tokenizer = load_default_model()
    expected = default.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    assert tokenizer.get_vocab() == default_tokenizer.get_vocab()
    assert tokenizer.bos_token == "<|im_start|>"  # the file's own tokenizer, quirks included (no default fixes)

    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "model.gguf").touch()
    with pytest.raises(ValueError, match="it holds model.gguf: pass the .gguf file itself"):
        load_model(holder)
    truncated = holder / "truncated.gguf"  # gguf's own errors name no file
    truncated.write_bytes(default_gguf_path().read_bytes()[:5_000_000])
    with pytest.raises(ValueError, match=f"GGUF file '{truncated}' could not be read .*damaged or truncated"):
        load_model(truncated)


def test_no_checkpoint_carries_the_gguf_as_its_tokenizer_model(tmp_path):
    """A tokenizer read from the GGUF named the file as its sentencepiece model: save_pretrained copied it (98 MB, every
    weight of the dense model) as tokenizer.model into the cache and from there into each pruned checkpoint."""
    from transformers import AutoTokenizer

    from optimum_prune import prune_checkpoint
    from optimum_prune.models import default_gguf_path, load_model

    from .conftest import tiny_model

    gguf = default_gguf_path()
    _, tokenizer = load_model(gguf)
    tiny = tiny_model(vocab_size=tokenizer.vocab_size)
    save_pruned(tiny, tmp_path / "from-gguf", tokenizer=tokenizer)
    stock = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # as an earlier conversion saved it
    stock.save_pretrained(tmp_path / "earlier")
    tiny.save_pretrained(tmp_path / "earlier")
    assert (tmp_path / "earlier" / "tokenizer.model").read_bytes()[:4] == b"GGUF"
    save_pruned(tiny, tmp_path / "from-earlier", tokenizer=load_model(tmp_path / "earlier")[1])
    prune_checkpoint(tmp_path / "earlier", tmp_path / "streamed", PruningConfig(method="magnitude"))
    for output in ("from-gguf", "from-earlier", "streamed"):
        assert not (tmp_path / output / "tokenizer.model").exists(), output
        assert load_model(tmp_path / output)[1]("A text.").input_ids == stock("A text.").input_ids


def test_wanda_beats_magnitude_at_half_sparsity():
    perplexities = {}
    for method in ("magnitude", "wanda"):
        model, tokenizer = load_default_model()
        prune(model, PruningConfig(method=method, sparsity=0.5, **SMALL), tokenizer=tokenizer)
        assert verify_sparsity(model)["overall_sparsity"] == pytest.approx(0.5, abs=0.005)
        perplexities[method] = evaluate_perplexity(model, tokenizer, max_tokens=4096)
    assert perplexities["wanda"] < perplexities["magnitude"], perplexities


def test_pruned_smollm_reloads_with_identical_logits(tmp_path):
    model, tokenizer = load_default_model()
    prune(model, PruningConfig(method="sparsegpt", sparsity="2:4", **SMALL), tokenizer=tokenizer)
    output = save_pruned(model, tmp_path / "smollm-2of4", tokenizer=tokenizer)
    ids = tokenizer(["The history of anarchism begins"], return_tensors="pt").input_ids
    assert_stock_reload_matches(model, output, ids, tmp_path)
