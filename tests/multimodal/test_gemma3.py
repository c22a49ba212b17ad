"""Gemma 3 with images: a SigLIP tower, a projector without linears and a Gemma 3 language tower.

Built from a tiny random ``Gemma3ForConditionalGeneration``, calibrated on processed batches or on image-text
pairs through a real ``Gemma3Processor`` over the offline BPE tokenizer with Gemma's image tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from optimum_prune import PruningConfig, get_adapter, prune, save_pruned
from optimum_prune.data.images import image_text_pairs
from optimum_prune.evaluation import evaluate_image_text_loss
from optimum_prune.adapters.gemma import SandwichNormAdapter
from tests.conftest import TINY, token_windows

IMAGE = 300  # the image soft token; BOI / EOI follow
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def tiny_gemma3(seed: int = 0, image: int = IMAGE) -> Gemma3ForConditionalGeneration:
    """``image``: the soft token's id; the start and end of image follow it, the last ids of the vocabulary."""
    text = Gemma3TextConfig(**{**TINY, "vocab_size": image + 3, "head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 2})
    config = Gemma3Config(
        text_config=text, vision_config=SiglipVisionConfig(**VISION), mm_tokens_per_image=4,
        image_token_index=image, boi_token_index=image + 1, eoi_token_index=image + 2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises it to zeros: the images would not reach the language model
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.1)
    return model


def image_batch(seed: int) -> dict[str, torch.Tensor]:
    """Text, <start_of_image>, the image's 4 soft tokens, <end_of_image>, text; image tokens attend bidirectionally."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 200, (1, 14), generator=generator)
    image = torch.tensor([[IMAGE + 1, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE + 2]])
    ids = torch.cat([words[:, :4], image, words[:, 4:]], dim=1)
    pixels = torch.randn(1, 3, 32, 32, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "token_type_ids": (ids == IMAGE).long()}


@pytest.fixture(scope="module")
def gemma3_processor(bpe_tokenizer) -> Gemma3Processor:
    """A real Gemma 3 processor over the offline BPE tokenizer with Gemma's three image tokens (ids 320-322)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<eos>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>", "<start_of_image>", "<end_of_image>"]})
    return Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer, image_seq_length=4)


def test_image_text_pairs_calibrate_and_evaluate_through_its_processor(gemma3_processor):
    """Gemma 3's processor expands <start_of_image>, not its image_token (the soft token): the pairs put the wrong one first."""
    model = tiny_gemma3(image=gemma3_processor.tokenizer.convert_tokens_to_ids("<image_soft_token>"))
    pairs = image_text_pairs("calibration")[:3]
    before = evaluate_image_text_loss(model, gemma3_processor, image_text_pairs("evaluation")[:2])
    report = prune(model, {"method": "wanda", "parts": {"vision": {}, "language": {}}}, pairs, processor=gemma3_processor)
    assert report.calibration_images == 3 and report.part_sparsity("vision") == pytest.approx(0.5)
    assert evaluate_image_text_loss(model, gemma3_processor, image_text_pairs("evaluation")[:2]) != before


def test_the_images_reach_the_language_model():
    model, batch = tiny_gemma3(), image_batch(0)
    with torch.no_grad():
        other_image = model(**{**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}).logits
        assert not torch.allclose(model(**batch).logits, other_image)


def test_the_parts_and_the_language_towers_adapter():
    model = tiny_gemma3()
    parts = get_adapter(model).parts()
    assert list(parts) == ["vision", "projector", "language"]
    assert isinstance(parts["language"], SandwichNormAdapter) and parts["language"].decoder is model.model.language_model
    assert parts["vision"].layer_names() == [f"model.vision_tower.vision_model.encoder.layers.{i}" for i in range(2)]


def test_image_calibration_prunes_the_named_parts_only():
    model = tiny_gemma3()
    before = copy.deepcopy(model.state_dict())
    report = prune(model, {"method": "wanda", "parts": {"vision": {}, "language": {"sparsity": "2:4"}}}, [image_batch(0), image_batch(1)])
    assert report.parts == ["vision", "language"] and report.calibration_images == 2
    assert report.part_sparsity("vision") == pytest.approx(0.5) and report.part_sparsity("language") == pytest.approx(0.5)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith(("model.vision_tower.", "model.language_model.")) for name in changed)
    with torch.no_grad():
        assert torch.isfinite(model(**image_batch(2)).logits).all()


def test_the_projector_holds_no_linear_to_prune():
    with pytest.raises(ValueError, match="the projector part of Gemma3ForConditionalGeneration holds no linear to prune"):
        prune(tiny_gemma3(), {"method": "magnitude", "parts": {"projector": {}}})


def test_structured_language_pruning_reloads_and_generates_with_an_image(tmp_path):
    model = tiny_gemma3()
    config = PruningConfig(method="width", sparsity=0.2, method_options={"ranking": "global"})
    prune(model, config, calibration=token_windows(samples=4, seq_len=24, vocab=200))
    reloaded = AutoModelForImageTextToText.from_pretrained(save_pruned(model, tmp_path / "narrow")).eval()
    batch = image_batch(3)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
    generated = reloaded.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, model.generate(**batch, max_new_tokens=6, do_sample=False))


def test_slicegpt_is_refused_for_the_language_tower():
    model = tiny_gemma3()
    with pytest.raises(ValueError, match="SliceGPT does not apply"):
        prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows(samples=4, seq_len=24, vocab=200))
