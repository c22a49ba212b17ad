"""LLaVA-style models: three prunable parts, image-text calibration, save/reload, generation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    SiglipVisionConfig,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

from optimum_prune import PruningConfig, get_adapter, prune, verify_sparsity
from optimum_prune.calibration import capture_first_layer_inputs, image_text_batches
from optimum_prune.data.images import image_text_pairs
from optimum_prune.evaluation import evaluate_image_text_loss
from tests.conftest import TINY, tiny_model, token_windows

from .conftest import IMAGE_TOKENS

PART_PREFIXES = {
    "vision": "model.vision_tower.",
    "projector": "model.multi_modal_projector.",
    "language": "model.language_model.",
}


@pytest.fixture(scope="module")
def pairs():
    return image_text_pairs("calibration")[:4]


def changed_parameters(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}


def test_parts_are_vision_projector_language_in_execution_order(llava):
    parts = get_adapter(llava).parts()
    assert list(parts) == ["vision", "projector", "language"]
    assert parts["vision"].layer_names()[0] == "model.vision_tower.vision_model.encoder.layers.0"
    assert parts["projector"].layer_names() == ["model.multi_modal_projector"]
    assert parts["language"].layer_names()[-1] == "model.language_model.layers.2"
    assert set(parts["projector"].prunable_linears(llava.model.multi_modal_projector)) == {"linear_1", "linear_2"}


def test_language_layer_inputs_include_the_image_tokens(llava, llava_processor, pairs):
    batches = image_text_batches(pairs[:2], llava_processor, num_samples=2)
    inputs = capture_first_layer_inputs(get_adapter(llava), batches, torch.device("cpu"))
    for batch, hidden in zip(batches, inputs.hidden_states):
        is_image = batch["input_ids"][0] == llava.config.image_token_id
        assert int(is_image.sum()) == IMAGE_TOKENS
        with torch.no_grad():
            image_features = llava.get_image_features(pixel_values=batch["pixel_values"])[0]
        assert torch.allclose(hidden[0, is_image], image_features)


@pytest.mark.parametrize("part", ["vision", "projector", "language"])
def test_pruning_one_part_changes_only_that_part(llava, llava_processor, pairs, part):
    before = {name: tensor.clone() for name, tensor in llava.state_dict().items()}
    report = prune(llava, {"method": "wanda", "sparsity": 0.5, "parts": {part: {}}, "num_calibration_samples": 4}, pairs, processor=llava_processor)
    changed = changed_parameters(before, llava)
    assert changed and all(name.startswith(PART_PREFIXES[part]) for name in changed)
    assert report.parts == [part] and report.calibration_images == 4
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("feature_layer, read", [(-2, 2), (1, 1)])
def test_vision_layers_the_model_never_reads_stay_dense_and_out_of_the_report(llava, llava_processor, pairs, feature_layer, read):
    """LLaVA reads hidden state vision_feature_layer: later layers were calibrated, pruned, counted in the
    vision sparsity and took a share of OWL's allocation, for nothing."""
    llava.config.vision_feature_layer = feature_layer
    config = {"method": "wanda", "sparsity": 0.5, "parts": {"vision": {}}, "num_calibration_samples": 4}
    report = prune(llava, config, pairs, processor=llava_processor)
    layers = llava.model.vision_tower.vision_model.encoder.layers
    assert sorted(report.layer_sparsities("vision")) == list(range(read))
    assert all(float((m.weight == 0).float().mean()) == 0.0 for layer in layers[read:] for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert report.part_sparsity("vision") == pytest.approx(0.5, abs=0.02)


def test_default_prunes_only_the_language_tower(llava, llava_processor, pairs):
    before = {name: tensor.clone() for name, tensor in llava.state_dict().items()}
    report = prune(llava, {"method": "sparsegpt", "sparsity": "2:4", "num_calibration_samples": 4}, pairs, processor=llava_processor)
    changed = changed_parameters(before, llava)
    assert changed and all(name.startswith(PART_PREFIXES["language"]) for name in changed)
    assert report.parts == ["language"] and "(image-text, 4 images)" in str(report)
    assert verify_sparsity(llava.model.language_model, "2:4")["conforming"]


def test_separate_policies_per_part_save_reload_and_generate_with_an_image(llava, llava_processor, pairs, tmp_path):
    config = PruningConfig(
        method="wanda",
        parts={"vision": {"sparsity": 0.3}, "projector": {"sparsity": "2:4"}, "language": {}},
        num_calibration_samples=4,
    )
    report = prune(llava, config, pairs, processor=llava_processor)
    measured = {part: report.part_sparsity(part) for part in report.parts}
    assert measured["vision"] == pytest.approx(0.3, abs=0.02)
    assert measured["projector"] == pytest.approx(0.5) and measured["language"] == pytest.approx(0.5)

    llava.save_pretrained(tmp_path / "pruned")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "pruned").eval()
    assert PruningConfig.from_dict(reloaded.config.pruning_config) == config
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, llava.state_dict()[name]), name
    prompt = llava_processor(images=pairs[0]["image"], text="<image>\nA photo of", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    uncached = reloaded.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6 and torch.equal(generated, uncached)
    assert torch.equal(generated, llava.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_mixed_calibration_feeds_text_batches_to_the_language_tower_only(llava, llava_processor, pairs):
    image_batches = image_text_batches(pairs[:2], llava_processor, num_samples=2)
    text_batches = [{"input_ids": window[None]} for window in token_windows(3, 16)]
    mixed = [*image_batches, *text_batches]
    adapter = get_adapter(llava)
    assert len(capture_first_layer_inputs(adapter.parts()["vision"], mixed, torch.device("cpu")).hidden_states) == 2
    assert len(capture_first_layer_inputs(adapter, mixed, torch.device("cpu")).hidden_states) == 5
    report = prune(llava, {"method": "wanda", "parts": {"vision": {}, "language": {}}}, mixed)
    assert report.calibration_images == 2 and report.parts == ["vision", "language"]


def test_text_only_calibration_prunes_the_language_tower_and_says_so(llava):
    before = {name: tensor.clone() for name, tensor in llava.state_dict().items()}
    report = prune(llava, {"method": "wanda", "num_calibration_samples": 4, "calibration_seq_len": 16}, token_windows(4, 16))
    assert report.calibration_images == 0 and "(text only, no images)" in str(report)
    changed = changed_parameters(before, llava)
    assert changed and all(name.startswith("model.language_model.layers.") for name in changed)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_structured_width_pruning_of_the_language_tower_reloads(llava, tmp_path):
    report = prune(llava, {"method": "width", "sparsity": 0.3, "method_options": {"ranking": "global"}, "num_calibration_samples": 4, "calibration_seq_len": 16}, token_windows(4, 16))
    assert "MACs per text token (language model): " in str(report)  # the vision tower's pass is not in it; parameters hold it
    assert hasattr(llava.config, "quantization_config")  # global ranking: per-layer widths
    llava.save_pretrained(tmp_path / "narrow")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "narrow").eval()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, llava.state_dict()[name]), name


def test_slicegpt_keeps_the_embedding_width_the_projector_writes_into(llava, llava_processor, pairs, tmp_path):
    """The projector writes image features into the embedding space: sliced ends would leave them
    wider than the text embeddings (LLaVA's text tower is untied), so the ends keep the full width."""
    assert llava.get_output_embeddings().weight is not llava.get_input_embeddings().weight
    prune(llava, {"method": "slicegpt", "sparsity": 0.25, "num_calibration_samples": 4, "calibration_seq_len": 16}, token_windows(4, 16))
    assert llava.get_input_embeddings().embedding_dim == TINY["hidden_size"]
    prompt = llava_processor(images=pairs[0]["image"], text="<image>\nA photo of", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(llava(**prompt).logits).all()
    llava.save_pretrained(tmp_path / "sliced")
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "sliced").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**prompt).logits, llava(**prompt).logits)


def test_image_conditioned_loss_scores_only_caption_tokens(llava, llava_processor, pairs):
    loss = evaluate_image_text_loss(llava, llava_processor, pairs[:2])
    # Reference: transformers' own shifted loss with every label but the caption's masked out.
    total, tokens = 0.0, 0
    for pair, batch in zip(pairs[:2], image_text_batches(pairs[:2], llava_processor, 2)):
        scored = len(llava_processor.tokenizer(pair["text"], add_special_tokens=False)["input_ids"])
        labels = torch.full_like(batch["input_ids"], -100)
        labels[0, -scored:] = batch["input_ids"][0, -scored:]
        with torch.no_grad():
            total += llava(**batch, labels=labels).loss.item() * scored
        tokens += scored
    assert loss == pytest.approx(total / tokens, rel=1e-5)
    # A text that places the image itself has a prompt that cannot be told from the caption: it scored the
    # prompt and the image placeholders, or failed without a BOS token.
    prompted = [{**pairs[0], "text": "USER: <image>\nDescribe it. ASSISTANT: " + pairs[0]["text"]}]
    with pytest.raises(ValueError, match="pair 0's text holds the image placeholder '<image>': .* give the caption alone"):
        evaluate_image_text_loss(llava, llava_processor, prompted)


def test_errors_name_the_field_and_the_fix(llava, llava_processor, pairs):
    with pytest.raises(ValueError, match=r"PruningConfig.parts names vision, but LlamaForCausalLM has only the part\(s\) language"):
        prune(tiny_model(), {"method": "magnitude", "parts": {"vision": {}}})
    with pytest.raises(ValueError, match="unknown part 'audio'"):
        PruningConfig(parts={"audio": {}})
    with pytest.raises(ValueError, match=r"PruningConfig.parts\['vision'\].sparsity must be in \[0, 1\)"):
        PruningConfig(parts={"vision": {"sparsity": 1.5}})
    with pytest.raises(ValueError, match="unknown key\\(s\\) ratio"):
        PruningConfig(parts={"vision": {"ratio": 0.5}})
    with pytest.raises(ValueError, match="structured method 'width' prunes the language tower only"):
        PruningConfig(method="width", sparsity=0.2, parts={"vision": {}})
    before = {name: tensor.clone() for name, tensor in llava.state_dict().items()}
    with pytest.raises(ValueError, match=r"PruningConfig.parts vision run only on images.*image-text pairs.*calibration=None with processor= reads the bundled"):
        prune(llava, {"method": "wanda", "parts": {"vision": {}, "language": {}}, "calibration_seq_len": 16}, token_windows(4, 16))
    with pytest.raises(ValueError, match="needs the model's processor"):
        prune(llava, {"method": "wanda", "num_calibration_samples": 2}, pairs)
    with pytest.raises(ValueError, match="calibrates on text token windows"):
        prune(llava, {"method": "width", "sparsity": 0.2}, pairs, processor=llava_processor)
    assert not changed_parameters(before, llava)


VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


@pytest.mark.parametrize(
    "model_cls, config_cls, vision_config",
    [
        (LlavaNextForConditionalGeneration, LlavaNextConfig, CLIPVisionConfig(**VISION)),
        (VipLlavaForConditionalGeneration, VipLlavaConfig, CLIPVisionConfig(**VISION)),
        (LlavaForConditionalGeneration, LlavaConfig, SiglipVisionConfig(**VISION)),
    ],
    ids=["llava-next", "vip-llava", "llava-siglip"],
)
def test_other_llava_classes_expose_the_same_parts(model_cls, config_cls, vision_config):
    extra = {"image_grid_pinpoints": [[32, 32]]} if config_cls is LlavaNextConfig else {}
    config = config_cls(vision_config=vision_config, text_config=LlamaConfig(**TINY), image_token_id=TINY["vocab_size"] - 1, **extra)
    model = model_cls(config).eval()
    report = prune(model, {"method": "magnitude", "parts": {"vision": {}, "projector": {}, "language": {}}})
    assert report.parts == ["vision", "projector", "language"]
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_llava_next_calibrates_on_any_resolution_crops(llava_processor, pairs):
    """LLaVA-NeXT splits each image into a grid of crops (5-D pixel_values, image_sizes); every part calibrates."""
    grid = [[32, 64], [64, 32]]
    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(
        image_processor=images, tokenizer=llava_processor.tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>",
    )  # fmt: skip
    image_token = llava_processor.tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**{**TINY, "vocab_size": image_token + 1}),
        image_token_id=image_token, image_grid_pinpoints=grid,
    )  # fmt: skip
    model = LlavaNextForConditionalGeneration(config).eval()
    report = prune(model, {"method": "wanda", "parts": {"vision": {}, "projector": {}, "language": {}}}, pairs[:3], processor=processor)
    assert report.parts == ["vision", "projector", "language"] and report.calibration_images == 3
    assert all(report.part_sparsity(part) == pytest.approx(0.5) for part in report.parts)


def test_a_quantized_tower_the_config_prunes_is_refused(llava):
    """It was skipped without a word (only the language tower's linears were checked)."""
    quanto = pytest.importorskip("optimum.quanto")
    quanto.quantize(llava.model.vision_tower, weights=quanto.qint8)
    quanto.freeze(llava.model.vision_tower)
    with pytest.raises(ValueError, match=r"model.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj is already quantized"):
        prune(llava, {"method": "magnitude", "parts": {"vision": {}, "language": {}}})
    prune(llava, {"method": "magnitude"})  # the language tower alone is unquantized


def test_sparsify_swaps_every_parts_24_linears(llava):
    from optimum_prune import sparsify

    prune(llava, {"method": "magnitude", "sparsity": "2:4", "parts": {"vision": {}, "projector": {}, "language": {}}})
    report = sparsify(llava)
    swapped = {part: sum(name.startswith(prefix) for name in report.swapped) for part, prefix in PART_PREFIXES.items()}
    assert all(swapped.values()) and not report.left_dense, swapped


def test_the_report_states_each_parts_sparsity(llava):
    report = prune(llava, {"method": "magnitude", "sparsity": 0.5, "parts": {"language": {"sparsity": 0.2}}})
    assert "Pruning report: magnitude language 0.2 (uniform)" in str(report) and report.part_sparsity("language") == pytest.approx(0.2, abs=0.01)


def test_compress_calibrates_a_multimodal_model_on_image_text_pairs(llava, llava_processor, pairs):
    from optimum_prune import compress

    (report,) = compress(llava, [PruningConfig(method="wanda", parts={"vision": {}, "language": {}}, num_calibration_samples=2)],
                         calibration=pairs, processor=llava_processor)  # fmt: skip
    assert report.calibration_images == 2 and report.part_sparsity("vision") == pytest.approx(0.5, abs=0.01)


def test_pruning_a_llava_checkpoint_from_disk_says_to_load_it_in_memory(llava, tmp_path):
    llava.save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match="holds a LlavaConfig model, not a causal LM: .* load this one in memory"):
        prune(str(tmp_path / "llava"), {"method": "magnitude"}, output_dir=tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["llava"]


def test_a_llava_quantized_by_optimum_quanto_is_not_saved_in_a_format_that_would_not_reload_it(llava, llava_processor, pairs, tmp_path):
    """optimum-quanto reloads causal LMs only (and requantizes LLaVA's legacy checkpoint keys into nothing)."""
    pytest.importorskip("optimum.quanto")
    from transformers import QuantoConfig

    from optimum_prune import compress, save_pruned

    compress(llava, [PruningConfig(method="wanda", sparsity="2:4", num_calibration_samples=2), QuantoConfig(weights="int8")],
             calibration=pairs, processor=llava_processor)  # fmt: skip
    with pytest.raises(ValueError, match="reloads causal language models only .* not a LlavaForConditionalGeneration: save the pruned model before quantizing"):
        save_pruned(llava, tmp_path / "quantized")
    assert list(tmp_path.iterdir()) == []


def test_width_after_a_2_4_language_tower_says_the_pattern_is_gone_with_the_pattern_given_per_part(llava, caplog):
    """The pattern was read from PruningConfig.sparsity only (0.5 here), and the vision tower left dense made
    the whole model non-conforming before: no warning either way."""
    import logging

    prune(llava, {"method": "magnitude", "parts": {"language": {"sparsity": "2:4"}}})
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(llava, {"method": "width", "sparsity": 0.3, "method_options": {"criterion": "magnitude_l1"}}, token_windows(4, 16))
    assert "undid the model's earlier unstructured pruning" in caplog.text and "no longer 2:4" in caplog.text


def test_an_allocation_a_later_part_cannot_make_is_refused_before_any_part_changes(llava, llava_processor, pairs):
    """The vision tower was pruned, then the language tower's OWL range failed: the model was left half-pruned."""
    before = {name: tensor.clone() for name, tensor in llava.state_dict().items()}
    config = PruningConfig(
        method="wanda", allocation="owl", allocation_options={"max_deviation": 0.2}, num_calibration_samples=4,
        parts={"vision": {"sparsity": 0.3}, "language": {"sparsity": 0.9}},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"the language part: OWL with target 0.9 and max_deviation 0.2 gives layer sparsities outside"):
        prune(llava, config, pairs, processor=llava_processor)
    assert not changed_parameters(before, llava) and not getattr(llava.config, "pruning_config", None)


def test_sparsity_masks_keep_every_pruned_parts_zeros(llava, llava_processor, pairs):
    """PruningCallback's masks held the language tower's linears only: training put a pruned vision tower's zeros back."""
    from optimum_prune import SparsityMasks

    config = PruningConfig(method="wanda", num_calibration_samples=2, parts={"vision": {}, "projector": {}, "language": {}})
    prune(llava, config, pairs, processor=llava_processor)
    masks = SparsityMasks.from_zeros(llava)
    assert {name.split(".")[1] for name in masks.linears} == {"vision_tower", "multi_modal_projector", "language_model"}
    with torch.no_grad():
        for linear in masks.linears.values():
            linear.weight.add_(1.0)  # what an optimizer step does to zeros
    masks.apply()
    for name, linear in masks.linears.items():
        assert float((linear.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02), name


def test_a_datasets_dataset_of_image_text_pairs_calibrates_on_its_images(llava, llava_processor):
    """README: image-text pairs may come as a datasets.Dataset with 'image' and 'text' columns."""
    from datasets import Dataset

    dataset = Dataset.from_list(image_text_pairs("calibration")[:3])
    config = {"method": "wanda", "parts": {"vision": {}, "language": {}}, "num_calibration_samples": 2}
    report = prune(llava, config, dataset, processor=llava_processor)
    assert report.calibration_images == 2 and report.parts == ["vision", "language"]


def test_a_caption_goes_on_the_line_after_the_image_unless_it_places_the_image_itself(llava_processor):
    pair = image_text_pairs("calibration")[0]
    placed = {**pair, "text": "USER: <image>\nDescribe it. ASSISTANT: a photo"}  # not given a second image
    for given, text in ((pair, "<image>\n" + pair["text"]), (placed, placed["text"])):
        (batch,) = image_text_batches([given], llava_processor, 1)
        assert torch.equal(batch["input_ids"], llava_processor(images=pair["image"], text=text, return_tensors="pt")["input_ids"])


def test_the_report_counts_every_image_of_a_batch_holding_two(llava, llava_processor):
    pairs = image_text_pairs("calibration")[:2]
    batch = llava_processor(images=[p["image"] for p in pairs], text="<image><image>\n" + pairs[0]["text"], return_tensors="pt")
    assert len(batch["pixel_values"]) == 2
    report = prune(llava, {"method": "wanda", "parts": {"vision": {}, "language": {}}}, [dict(batch)])
    assert report.calibration_images == 2



def test_image_text_loss_refuses_a_nan_loss(llava, llava_processor):
    """It returned nan, a number to print, where evaluate_perplexity refuses."""
    with torch.no_grad():
        llava.model.language_model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="next-token loss is NaN on the captions"):
        evaluate_image_text_loss(llava, llava_processor, image_text_pairs("evaluation")[:2])


def test_image_text_loss_refuses_empty_or_malformed_pairs(llava, llava_processor):
    from optimum_prune.data.images import image_text_pairs

    image = image_text_pairs("evaluation")[0]["image"]
    with pytest.raises(ValueError, match="pairs"):  # was: ZeroDivisionError
        evaluate_image_text_loss(llava, llava_processor, [])
    with pytest.raises(ValueError, match="text"):  # was: TypeError "argument of type 'NoneType' is not iterable"
        evaluate_image_text_loss(llava, llava_processor, [{"image": image, "text": None}])
    with pytest.raises(ValueError, match="image"):  # was: KeyError 'image'
        evaluate_image_text_loss(llava, llava_processor, [{"text": "a cat"}])


def test_the_cli_prunes_a_vision_tower_on_the_bundled_images_and_keeps_the_processor(llava, llava_processor, tmp_path, capsys):
    """--part vision could never run with a calibrated method (the CLI gave prune no processor, and its error said
    processor=...), and the output lost the processor: AutoProcessor could not load it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from optimum_prune import OptimumPruner
    from optimum_prune.cli import main

    llava.save_pretrained(tmp_path / "m")
    llava_processor.save_pretrained(tmp_path / "m")
    flags = ["-m", str(tmp_path / "m"), "--method", "wanda", "--part", "language", "--part", "vision=0.3",
             "--calibration-samples", "4", "--seq-len", "32"]  # fmt: skip
    assert main([*flags, "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["calibration_images"] == 4
    assert report["part_sparsity"]["vision"] == pytest.approx(0.3, abs=0.01)
    AutoProcessor.from_pretrained(tmp_path / "out")  # the output is a whole vision-language checkpoint
    expected = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    prune(expected, PruningConfig(method="wanda", num_calibration_samples=4, calibration_seq_len=32, parts={"language": {}, "vision": {"sparsity": 0.3}}),
          calibration=image_text_pairs("calibration"), processor=llava_processor)  # fmt: skip
    pruned = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert all(torch.equal(pruned.state_dict()[name], tensor) for name, tensor in expected.state_dict().items())
    OptimumPruner.from_pretrained(tmp_path / "m").prune(
        PruningConfig(method="wanda", num_calibration_samples=4, calibration_seq_len=32, parts={"language": {}, "vision": {"sparsity": 0.3}}),
        save_dir=tmp_path / "optimum",
    )
    pruned = LlavaForConditionalGeneration.from_pretrained(tmp_path / "optimum")
    assert all(torch.equal(pruned.state_dict()[name], tensor) for name, tensor in expected.state_dict().items())
    AutoProcessor.from_pretrained(tmp_path / "optimum")
    (tmp_path / "text.txt").write_text("The cat sat on the mat. " * 200)
    with pytest.raises(SystemExit):
        main([*flags, "-o", str(tmp_path / "out2"), "--calibration", str(tmp_path / "text.txt")])
    assert "--part vision calibrates on images, which the --calibration text has none of" in capsys.readouterr().err
    for name in ("preprocessor_config.json", "processor_config.json"):
        (tmp_path / "m" / name).unlink(missing_ok=True)
    with pytest.raises(SystemExit):
        main([*flags, "-o", str(tmp_path / "out3")])
    assert "--part vision calibrates on images, which need the model's processor" in capsys.readouterr().err


def test_a_checkpoint_with_an_image_processor_and_no_tokenizer_prunes_data_free_and_keeps_it(llava, tmp_path):
    """Loading its processor failed inside sentencepiece ("Either model_file or model_proto must be specified"), where
    the CLI and OptimumPruner pruned it before (data-free pruning is the missing-tokenizer error's way out)."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    from optimum_prune import OptimumPruner
    from optimum_prune.cli import main

    from .conftest import IMAGE_SIZE

    llava.save_pretrained(tmp_path / "m")
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(tmp_path / "m")
    assert main(["-m", str(tmp_path / "m"), "--method", "magnitude", "-o", str(tmp_path / "out")]) == 0
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path / "out"), CLIPImageProcessor)
    OptimumPruner.from_pretrained(tmp_path / "m").prune(PruningConfig(method="magnitude"), save_dir=tmp_path / "optimum")
    assert (tmp_path / "optimum" / "preprocessor_config.json").is_file()
